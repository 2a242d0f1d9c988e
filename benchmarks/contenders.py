"""What the benches measure side by side, and the world they run in.

A `Stage` is one run's throwaway world: a work directory, a CA, the fast fake provider (an Envoy
answering a fixed chat completion, `extproc/testing/envoy_fake.py`, also over plain HTTP for
LiteLLM), and every process started; closing it stops them all and removes the directory.

A `Contender` is one thing measured beside others, each reaching the fake by the provider's host
name (--resolve or a static cluster): `start_bare` (Envoy alone, its config written by hand: the
limit), `start_gateway` (`extproc up`, this checkout or another, e.g. `h2_library_source`'s),
`start_served` (`extproc serve --workers N` behind an Envoy of the gateway's bootstrap),
`start_floor` (benchmarks/floor.py: the design's cost), `start_litellm` (LiteLLM proxy, one worker,
in a virtual environment of its own). Beside them: `start_paced_provider` (the streaming
benchmark's provider) and `start_redis`.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from extproc.demo.ca import ThrowawayCA
from extproc.demo.run import manifests_dir
from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap, token_sds
from extproc.envoy.clusters import UpstreamOptions, provider_cluster
from extproc.ops.up import envoy_binary
from extproc.testing.envoy_fake import start_envoy_fake
from extproc.testing.ports import free_port

from .floor import floor_bootstrap
from .measure import Processes, timed_requests, wait_http

ROOT = Path(__file__).resolve().parent.parent  # the repository: `python -m benchmarks` runs from here
HOST = "dashscope.aliyuncs.com"  # the seed's first provider, served by the fake
PATH = "/compatible-mode/v1/chat/completions"
KEY = "sk-" + os.urandom(32).hex()  # the provider key, and LiteLLM's master key
MESSAGES = [{"role": "user", "content": "Please introduce yourself."}]
PACED_HOST = "paced.llm.test"  # the streaming benchmark's provider (benchmarks/streams.py)
PACED_PROVIDER_YAML = f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: paced
spec:
  host: {PACED_HOST}
  configs:
    defaultConfig:
      openAIConfig:
        model: paced-model
        apiKey: ${{YOUR_DASHSCOPE_API_KEY}}
"""


@dataclass
class Contender:
    """One thing measured beside others: where it listens, wrk's script for it, and the processes
    read for it by account: "all" (every process that serves it), "ext_proc" (its ext_proc's
    process or processes alone), or what a bench adds."""

    name: str
    port: int
    processes: dict[str, Processes] = field(default_factory=dict)
    process: subprocess.Popen | None = None  # the one started for it (`extproc up`: the ext_proc, Envoy's parent)
    metrics_port: int | None = None
    script: Path | None = None


class Stage:
    """One run's throwaway world: a work directory, a CA, the fast fake provider for `hosts` (also
    over plain HTTP with `plain_http`), and every process started through `start`; `close` (or
    leaving the `with` block) stops them (SIGTERM, SIGKILL after `wait_s`) and removes the files."""

    def __init__(self, prefix: str, hosts: Sequence[str] = (HOST,), plain_http: bool = False, wait_s: float = 15):
        self.work = Path(tempfile.mkdtemp(prefix=prefix))
        self.procs: list[subprocess.Popen] = []
        self.wait_s = wait_s
        self.fake = None
        try:
            self.envoy = envoy_binary()
            self.ca = ThrowawayCA(self.work / "pki")
            self.fake_plain = free_port() if plain_http else None
            self.fake = start_envoy_fake(self.envoy, self.ca, list(hosts), free_port(), free_port(), self.work,
                                         plain_port=self.fake_plain)
        except BaseException:
            self.close()
            raise

    @property
    def fake_port(self) -> int:
        return self.fake.port

    def __enter__(self) -> Stage:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self, args: Sequence[object], log: str, **popen) -> subprocess.Popen:
        """A process stopped with the stage, its output in `log` under the work directory."""
        with (self.work / log).open("wb") as out:
            process = subprocess.Popen([str(a) for a in args], stdout=out, stderr=subprocess.STDOUT, **popen)
        self.procs.append(process)
        return process

    def start_envoy(self, name: str, config: dict) -> subprocess.Popen:
        (self.work / f"{name}.json").write_text(json.dumps(config))
        return self.start([self.envoy, "-c", self.work / f"{name}.json", "--disable-hot-restart",
                           "--log-level", "error"], f"{name}.log")

    def config_dir(self, name: str, *extra: tuple[str, str]) -> Path:
        """A config directory with the seed's first provider, and `extra` (file name, YAML) files."""
        config = self.work / name
        config.mkdir()
        shutil.copy(manifests_dir() / "01-LLMProvider.yaml", config)
        for file, text in extra:
            (config / file).write_text(text)
        return config

    def wait_serving(self, contender: Contender) -> None:
        """Until the contender answers the bench's request; its logs in the error if it never does."""
        try:
            wait_until_serving(contender.port)
        except RuntimeError:
            raise RuntimeError(f"{contender.name}: nothing serves on port {contender.port}{self.logs()}") from None

    def logs(self) -> str:
        return "".join(f"\n--- {f.name}\n" + f.read_text(errors="replace")[-3000:] for f in self.work.glob("*.log"))

    def close(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(self.wait_s)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
        if self.fake is not None:
            self.fake.stop()
            self.fake = None
        shutil.rmtree(self.work, ignore_errors=True)


def lua_script(path: str, host: str, body: dict, headers: Mapping[str, str] | None = None) -> str:
    """wrk's script for the bench's request: POST `body` to `path` on `host`, with the key."""
    payload = json.dumps(body).replace("'", "\\'")
    extra = "".join(f'wrk.headers["{k}"] = "{v}"\n' for k, v in (headers or {}).items())
    return (f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.body = \'{payload}\'\n'
            f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Host"] = "{host}"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n' + extra)


def write_script(stage: Stage, contenders: Sequence[Contender], headers: Mapping[str, str] | None = None) -> Path:
    """The bench's chat request to the provider host as a wrk script, given to each contender."""
    script = stage.work / "load.lua"
    script.write_text(lua_script("/", HOST, {"messages": MESSAGES}, headers))
    for c in contenders:
        c.script = script
    return script


def wait_until_serving(port: int) -> None:
    body = json.dumps({"messages": MESSAGES}).encode()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            timed_requests(port, HOST, body, 1)
            return
        except (OSError, AssertionError, http.client.HTTPException):
            time.sleep(0.2)
    raise RuntimeError(f"nothing serves on port {port}")


# --- bare Envoy -------------------------------------------------------------------------------


def bare_envoy_config(listen: int, admin: int, fake_port: int, ca_file: Path, paced_port: int | None = None) -> dict:
    """The limit: Envoy alone doing what the gateway asks of it, with the config written by hand."""
    cluster = provider_cluster("provider", HOST, UpstreamOptions(
        ca_file=str(ca_file), resolve={HOST: HostPort("127.0.0.1", fake_port)}))
    paced = [] if paced_port is None else [_bare_paced_host(paced_port, ca_file)]
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "bare", "codec_type": "AUTO",
           "route_config": {"virtual_hosts": [*(vh for vh, _ in paced), {"name": "all", "domains": ["*"], "routes": [{
               "match": {"prefix": "/"},
               "route": {"cluster": "provider", "prefix_rewrite": PATH, "host_rewrite_literal": HOST,
                         "timeout": "300s"},
               "request_headers_to_add": [{"header": {"key": "authorization", "value": f"Bearer {KEY}"},
                                           "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "bare",
                               "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                               "per_connection_buffer_limit_bytes": 8 << 20,
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [cluster, *(c for _, c in paced)]}}


def _bare_paced_host(paced_port: int, ca_file: Path) -> tuple[dict, dict]:
    """Bare Envoy's route and cluster to the streaming benchmark's paced provider."""
    cluster = provider_cluster("paced", PACED_HOST, UpstreamOptions(
        ca_file=str(ca_file), resolve={PACED_HOST: HostPort("127.0.0.1", paced_port)}))
    vhost = {"name": "paced", "domains": [PACED_HOST], "routes": [{
        "match": {"prefix": "/"}, "route": {"cluster": "paced", "timeout": "300s"},
        "request_headers_to_add": [{"header": {"key": "authorization", "value": f"Bearer {KEY}"},
                                    "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]}
    return vhost, cluster


def start_bare(stage: Stage, paced_port: int | None = None) -> Contender:
    port = free_port()
    envoy = stage.start_envoy("bare", bare_envoy_config(port, free_port(), stage.fake_port, stage.ca.cert_file,
                                                        paced_port))
    return Contender("bare", port, {"all": Processes.of(envoy.pid)}, envoy)


# --- the gateway --------------------------------------------------------------------------------


def start_gateway(stage: Stage, name: str, config: Path, *, resolve: Mapping[str, int] | None = None,
                  metrics: bool = False, access_log: str = "none", options: Sequence[str] = (),
                  env: Mapping[str, str] | None = None, source: Path | None = None,
                  command: Sequence[str] = (sys.executable, "-m", "extproc", "up")) -> Contender:
    """`extproc up` (or `command` taking its flags) on `config`, its ports its own, the provider
    hosts in `resolve` (default: the fake's) reached on 127.0.0.1; `source`: another checkout of
    the gateway to run instead of this one. Its output in `gateway-NAME.log`."""
    port = free_port()
    metrics_port = free_port() if metrics else None
    args = [*command, "--config", config, "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}",
            "--metrics", f"127.0.0.1:{metrics_port}" if metrics else "none", "--access-log", access_log,
            "--upstream-ca", stage.ca.cert_file]
    for host, upstream in (resolve or {HOST: stage.fake_port}).items():
        args += ["--resolve", f"{host}=127.0.0.1:{upstream}"]
    environ = {**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY, **(env or {})}
    if source:
        environ["PYTHONPATH"] = str(source)
    process = stage.start([*args, *options], f"gateway-{name}.log", env=environ, cwd=source or ROOT)
    return Contender(name, port, {"all": Processes.of(process.pid),
                                  "ext_proc": Processes.of(process.pid, descendants=False)},
                     process, metrics_port)


def h2_library_source(work: Path) -> Path:
    """A copy of this gateway whose ext_proc and access-log server (the HTTP/2 part) is
    benchmarks/h2_library_server.py, for `start_gateway(source=...)`."""
    tree = work / "h2lib"
    shutil.copytree(ROOT / "extproc", tree / "extproc")
    dataplane = tree / "extproc" / "dataplane"
    shutil.copy(Path(__file__).resolve().parent / "h2_library_server.py", dataplane / "h2_library_server.py")
    with (dataplane / "grpc_h2.py").open("a") as f:
        f.write("\nfrom .h2_library_server import serve, serve_unix  # noqa: E402,F811"
                "  (the bench's h2-library variant)\n")
    return tree


def start_served(stage: Stage, workers: int, config: Path) -> Contender:
    """`extproc serve --workers N` over TCP (with a token, as TCP requires; Envoy presents it on every
    stream), and an Envoy of the gateway's bootstrap in front of it; "ext_proc": the serve process and
    its workers."""
    token_file, sds_file = control_token(stage)
    control, ext_proc, listen = free_port(), free_port(), free_port()
    serve = stage.start([sys.executable, "-m", "extproc", "serve", "--config", config, "--workers", workers,
                         "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
                         "--auth-token-file", token_file, "--metrics", "none", "--upstream-ca", stage.ca.cert_file,
                         "--resolve", f"{HOST}=127.0.0.1:{stage.fake_port}"],
                        f"serve-{workers}.log", env={**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY}, cwd=ROOT)
    envoy = stage.start_envoy(f"envoy-{workers}", bootstrap(BootstrapOptions(
        listen=HostPort("127.0.0.1", listen), admin=HostPort("127.0.0.1", free_port()),
        control=HostPort("127.0.0.1", control), ext_proc=HostPort("127.0.0.1", ext_proc), access_log=None,
        token_sds=str(sds_file))))
    return Contender(f"workers={workers}", listen, {"all": Processes.of(serve.pid, envoy.pid),
                                                    "ext_proc": Processes.of(serve.pid)}, serve)


def control_token(stage: Stage) -> tuple[Path, Path]:
    """The control-plane token of a run (made once, in a directory only we can read) and the SDS
    file Envoy reads it through."""
    directory = stage.work / "token"
    token_file, sds_file = directory / "token", stage.work / "token-sds.json"
    if not token_file.exists():
        directory.mkdir(mode=0o700)
        token_file.write_text(secrets.token_urlsafe(32))
        token_file.chmod(0o600)
        sds_file.write_text(json.dumps(token_sds(str(token_file))))
    return token_file, sds_file


# --- the floor and the paced provider -----------------------------------------------------------


def start_paced_provider(stage: Stage) -> int:
    """The streaming benchmark's paced provider (its own process: its CPU is nobody's); its port."""
    port = free_port()
    cert = stage.ca.issue([PACED_HOST], stem="paced")
    stage.start([sys.executable, "-m", "benchmarks", "paced-provider", cert.cert_file, cert.key_file, port],
                "paced.log", cwd=ROOT)
    return port


def start_floor(stage: Stage, paced_port: int) -> Contender:
    """The floor: its ext_proc server and an Envoy of the gateway's bootstrap, serving the fake
    provider and the paced one."""
    ext_proc, port = free_port(), free_port()
    server = stage.start([sys.executable, "-m", "benchmarks", "floor-server", ext_proc,
                          "llm_provider_dashscope_aliyuncs_com", HOST, PATH, KEY], "floor.log", cwd=ROOT)
    options = {host: UpstreamOptions(ca_file=str(stage.ca.cert_file), resolve={host: HostPort("127.0.0.1", p)})
               for host, p in ((HOST, stage.fake_port), (PACED_HOST, paced_port))}
    clusters = {HOST: provider_cluster("llm_provider_dashscope_aliyuncs_com", HOST, options[HOST]),
                PACED_HOST: provider_cluster("llm_provider_paced", PACED_HOST, options[PACED_HOST])}
    envoy = stage.start_envoy("floor-envoy", floor_bootstrap(port, free_port(), ext_proc, clusters,
                                                             str(stage.work / "floor-access.log")))
    return Contender("floor", port, {"all": Processes.of(envoy.pid, server.pid),
                                     "ext_proc": Processes.of(server.pid, descendants=False)}, server)


def start_headers_floor(stage: Stage, paced_port: int, name: str = "floor_headers",
                        drop: tuple[str, ...] = ()) -> Contender:
    """The headers-only floor (benchmarks/headers_floor.py): its ext_proc server and an Envoy of
    the floor's bootstrap with the headers-only path's filters, serving the fake provider and the
    paced one."""
    from .headers_floor import headers_floor_bootstrap

    ext_proc, port = free_port(), free_port()
    server = stage.start([sys.executable, "-m", "benchmarks", "headers-floor-server", ext_proc,
                          "llm_provider_dashscope_aliyuncs_com", PATH, KEY,
                          *(["trusting"] if "llm_gateway.body_read" in drop else [])], f"{name}.log", cwd=ROOT)
    options = {host: UpstreamOptions(ca_file=str(stage.ca.cert_file), resolve={host: HostPort("127.0.0.1", p)})
               for host, p in ((HOST, stage.fake_port), (PACED_HOST, paced_port))}
    clusters = {HOST: provider_cluster("llm_provider_dashscope_aliyuncs_com", HOST, options[HOST]),
                PACED_HOST: provider_cluster("llm_provider_paced", PACED_HOST, options[PACED_HOST])}
    envoy = stage.start_envoy(f"{name}-envoy", headers_floor_bootstrap(
        port, free_port(), ext_proc, clusters, str(stage.work / f"{name}-access.log"), drop))
    return Contender(name, port, {"all": Processes.of(envoy.pid, server.pid),
                                             "ext_proc": Processes.of(server.pid, descendants=False)}, server)


# --- LiteLLM and Redis --------------------------------------------------------------------------


def ensure_litellm(venv: Path) -> Path | None:
    litellm = venv / "bin" / "litellm"
    if litellm.exists():
        return litellm
    print(f"installing LiteLLM into {venv} (once; a few minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], capture_output=True,
                            text=True)
    if result.returncode != 0 or not litellm.exists():
        print(f"LiteLLM could not be installed; it is left out:\n{result.stderr[-2000:]}")
        return None
    return litellm


def start_litellm(stage: Stage, litellm: Path) -> Contender:
    """LiteLLM proxy, one worker, over plain HTTP to the fake; started and answering."""
    port = free_port()
    (stage.work / "litellm.yaml").write_text(json.dumps({"model_list": [{
        "model_name": "qwen1.5-72b-chat",
        "litellm_params": {"model": "openai/qwen1.5-72b-chat", "api_key": KEY,
                           "api_base": f"http://127.0.0.1:{stage.fake_plain}/compatible-mode/v1"}}],
        "litellm_settings": {"telemetry": False}, "general_settings": {"master_key": KEY}}))
    process = stage.start([litellm, "--config", stage.work / "litellm.yaml", "--port", port, "--num_workers", "1"],
                          "litellm.log", env={**os.environ, "LITELLM_LOG": "ERROR"})
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", 180, process)
    contender = Contender("litellm", port, {"all": Processes.of(process.pid)}, process)
    contender.script = stage.work / "litellm.lua"
    contender.script.write_text(lua_script("/v1/chat/completions", f"127.0.0.1:{port}",
                                           {"model": "qwen1.5-72b-chat", "messages": MESSAGES}))
    return contender


def start_redis(stage: Stage) -> tuple[str, Processes]:
    """A Redis without persistence: its URL and its process."""
    port = free_port()
    process = stage.start(["redis-server", "--port", port, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                           "--dir", stage.work], "redis.log")
    return f"redis://127.0.0.1:{port}/0", Processes.of(process.pid)
