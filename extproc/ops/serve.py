"""`extproc serve`: the control plane alone, for Envoys run elsewhere (sidecars, an egress
gateway, `envoy-config`), on Unix sockets (local mode) or authenticated TCP, with replicas
(leader election for status) and worker processes (`--workers`)."""

from __future__ import annotations

import asyncio
import logging
import signal
from dataclasses import dataclass, field
from pathlib import Path

from ..config.kubernetes_source import KubernetesSource
from ..dataplane.authentication import Authenticator, AuthSetup, kubernetes_client
from ..dataplane.workload_identity import DEFAULT_GRACE_S as DEFAULT_IDENTITY_GRACE_S
from ..envoy.addresses import HostPort
from ..envoy.clusters import UpstreamOptions
from ..policy.body_memory import DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
from ..policy.caller import LOCAL, Caller
from ..policy.gateway_binding import MESH_VIEW, View
from ..protocol import DEFAULT_BODY_LIMIT, EXT_PROC_SOCKET, XDS_SOCKET
from ..telemetry.spend_redis import SpendStore
from .children import listening_problems
from .control_plane import ControlPlane
from .data_plane import DataPlane, judge_reach
from .drain import DEFAULT_GRACE_S, drain
from .leader import DEFAULT_LEASE_DURATION_S, DEFAULT_LEASE_NAME, LeaderElector, default_namespace
from .socket_dir import default_socket_dir, private_dir
from .startup import StartupError, config_source, load_initial
from .status_http import StatusServer
from .workers import WorkerSetup
from .workload_ca import DEFAULT_TTL_S, CAError, Issuer, WorkloadCA

log = logging.getLogger(__name__)

DEFAULT_XDS_LISTEN = HostPort("0.0.0.0", 18000)


@dataclass
class ServeOptions:
    config: list[str] = field(default_factory=list)  # files and directories; empty with `kubernetes`
    kubernetes: bool = False
    namespace: str | None = None
    key_env: dict[str, str] = field(default_factory=dict)
    home: str | None = None  # the control plane's namespace (see extproc.policy.visibility)
    view: View = MESH_VIEW
    upstream: UpstreamOptions = field(default_factory=UpstreamOptions)
    body_limit: int = DEFAULT_BODY_LIMIT
    socket_dir: str | None = None  # local mode
    listen: HostPort | None = None  # TCP: xDS (the ext_proc on the next port unless `ext_proc_listen`)
    ext_proc_listen: HostPort | None = None
    auth_token_file: str | None = None
    token_audience: str = "llm-gateway"
    metrics: HostPort | None = None
    redis_url: str | None = None
    redis_fail_closed: bool = False
    max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT
    drain_grace_s: float = DEFAULT_GRACE_S
    workers: int | None = None
    log_level: str = "info"
    lease_namespace: str | None = None
    lease_name: str = DEFAULT_LEASE_NAME
    lease_duration_s: float = DEFAULT_LEASE_DURATION_S
    caller: Caller = LOCAL  # local mode and a static token: who the Envoy's requests come from
    identity_grace_s: float = DEFAULT_IDENTITY_GRACE_S  # --kubernetes: last known pod labels, how long
    otlp_endpoint: str | None = None  # spans exported here by every process; None: no traces
    # the sidecars reach egress gateways over mutual TLS with certificates this control plane issues
    # (extproc.ops.workload_ca): its CA's files (None: the Kubernetes Secret, or one made at start),
    # their lifetime; or, `insecure_plain_gateway`, over plain HTTP
    workload_ca: str | None = None
    workload_cert_ttl_s: float = DEFAULT_TTL_S
    insecure_plain_gateway: bool = False

    @property
    def tcp(self) -> bool:
        return self.socket_dir is None and (self.kubernetes or self.listen is not None
                                            or self.ext_proc_listen is not None)

    def auth_description(self) -> AuthSetup:
        """How callers prove who they are over TCP, as a worker process is handed it."""
        if self.auth_token_file:
            return AuthSetup("static", self.auth_token_file, self.caller)
        return AuthSetup("review", self.token_audience, grace_s=self.identity_grace_s)


def transport(opts: ServeOptions) -> tuple[str | None, Authenticator | None]:
    """(socket dir, None) for local mode, or (None, authenticator) for TCP."""
    if not opts.tcp:
        try:
            return private_dir(opts.socket_dir or default_socket_dir()), None
        except OSError as exc:
            raise StartupError(f"cannot use the socket directory: {exc}") from None
    if opts.auth_token_file:
        try:
            return None, opts.auth_description().build()
        except (OSError, ValueError) as exc:
            raise StartupError(f"--auth-token-file {opts.auth_token_file}: {exc}") from None
    if opts.kubernetes:
        if opts.caller is not LOCAL:
            raise StartupError("--source-labels/--source-namespace state a local Envoy's identity: with --kubernetes "
                               "over TCP each Envoy's identity comes from its ServiceAccount token and its pod")
        try:
            return None, opts.auth_description().build()
        except Exception as exc:
            raise StartupError(f"cannot reach Kubernetes for TokenReviews: {exc}") from None
    raise StartupError("serve over TCP (--listen/--ext-proc-listen) needs --auth-token-file FILE: without it anyone "
                       "who reaches the port could obtain API keys (or use --socket-dir DIR for Unix sockets)")


def workload_issuer(opts: ServeOptions) -> Issuer | None:
    """The workload certificates this control plane issues, where the sidecars reach egress
    gateways (`--egress-gateway`) over mutual TLS; None where there is none to reach, or the hop
    is kept plain (`--insecure-plain-gateway`)."""
    if opts.view.gateway is not None:
        if not opts.insecure_plain_gateway:
            raise StartupError("serve --gateway: an egress gateway taking mutual TLS from the sidecars runs as "
                               "`extproc up --gateway` (its Envoy's listener requires their certificates); keep "
                               "this one's plain-HTTP listener with --insecure-plain-gateway")
        return None
    if not opts.view.egress:
        return None
    if opts.insecure_plain_gateway:
        log.warning("--insecure-plain-gateway: the sidecars send to egress gateways over plain HTTP, and a gateway "
                    "spends its keys for whoever reaches it")
        return None
    try:
        if opts.workload_ca:
            ca = WorkloadCA.from_directory(opts.workload_ca)
        elif opts.kubernetes:
            if not opts.home:
                raise StartupError("the workload CA is a Secret of the control plane's namespace, which is not known: "
                                   "--control-namespace NS (or --workload-ca DIR)")
            ca = WorkloadCA.from_kubernetes(kubernetes_client(), opts.home)
        else:
            ca = WorkloadCA.generate()
            log.info("workload CA made for this process (--workload-ca DIR keeps one across restarts)")
    except CAError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"--workload-ca {opts.workload_ca}: {exc}") from None
    return Issuer(ca, opts.workload_cert_ttl_s)


async def run_serve(opts: ServeOptions) -> int:
    """Serve until SIGINT or SIGTERM, then drain every process. Returns the exit code."""
    socket_dir, authenticator = transport(opts)
    listen = opts.listen or DEFAULT_XDS_LISTEN
    busy = listening_problems([("--metrics", opts.metrics)] + ([] if socket_dir is not None else [
        ("--listen", listen),
        ("--ext-proc-listen" if opts.ext_proc_listen else "--listen (its next port, the ext_proc's)",
         opts.ext_proc_listen or HostPort(listen.host, listen.port + 1))]))
    if busy:  # said before anything starts
        raise StartupError("\n".join(busy))
    # worker processes share a TCP port (SO_REUSEPORT); local mode's Unix socket has one process
    workers = WorkerSetup(opts.workers if socket_dir is None else 1, opts.max_body_bytes_in_flight, opts.body_limit,
                          opts.log_level, opts.auth_description() if socket_dir is None else None,
                          (opts.redis_url, opts.redis_fail_closed), opts.otlp_endpoint, judge_reach(opts.upstream))
    issuer = workload_issuer(opts)
    plane = DataPlane(workers.holder, opts.body_limit, workers.share, opts.redis_url, opts.redis_fail_closed,
                      otlp_endpoint=opts.otlp_endpoint, local=opts.caller, judges=judge_reach(opts.upstream))
    control = ControlPlane(opts.upstream, plane, reuse_port=workers.reuse_port, issuer=issuer)
    source = config_source(opts.config, opts.kubernetes, opts.namespace, control.apply, key_env=opts.key_env,
                           home=opts.home, view=opts.view)
    # Kubernetes: whether each provider's name resolves, as its LLMProvider's condition
    control.on_addresses = getattr(source, "addresses_changed", None)
    elector = None
    if isinstance(source, KubernetesSource):  # replicas: one writes status
        elector = LeaderElector(opts.lease_namespace or default_namespace(), opts.lease_name, opts.lease_duration_s,
                                on_elected=source.refresh)
        source.may_write_status = elector.is_leader
    await load_initial(source)
    status = StatusServer(workers.registry(plane.metrics.registry), lambda: control.loaded and not plane.draining,
                          plane.budgets.degraded_reason, plane.metrics.spend.since,
                          SpendStore(opts.redis_url) if opts.redis_url else None)
    try:
        await control.start(listen, opts.ext_proc_listen, authenticator=authenticator, socket_dir=socket_dir)
        if socket_dir is None:
            await workers.start((opts.ext_proc_listen or listen).host, control.ext_proc_port)
        if opts.metrics is not None:
            await status.start(opts.metrics)
    except OSError as exc:
        await workers.drain(0)
        await status.stop()
        await control.stop()  # the servers it started: none outlives the failed start
        raise StartupError(f"cannot listen: {exc}") from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    watcher = asyncio.create_task(source.run())
    electing = asyncio.create_task(elector.run()) if elector else None
    await stop.wait()
    if elector is not None and electing is not None:
        electing.cancel()
        await elector.release()
    # requests in flight finish, in every process; Envoy goes elsewhere
    await asyncio.gather(drain(plane, opts.drain_grace_s, xds=control.xds_server), workers.drain(opts.drain_grace_s))
    watcher.cancel()
    await status.stop()
    await control.stop()
    if socket_dir is not None:
        for name in (XDS_SOCKET, EXT_PROC_SOCKET):
            Path(socket_dir, name).unlink(missing_ok=True)
    return 0
