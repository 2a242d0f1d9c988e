"""What the egress gateway's hop costs (issue 33): a request decided by the pod's sidecar against
one the sidecar sends to the egress gateway, over mutual TLS, in one run (`scripts/bench
--gateway-hop`, or `python -m benchmarks gateway-hop`).

Every contender sends the same chat request through the same sidecar Envoy (`envoy-config
--sidecar`, its control plane `serve` over TCP with a token) to the same fast fake provider:
  sidecar        a host the sidecar decides: ext_proc at the sidecar's control plane, TLS from the pod
  gateway-mtls   a host bound to an egress gateway (`up --gateway`): the sidecar sends it over mutual
                 TLS (HTTP/2, one connection, workload certificates from the control plane over SDS)
                 to the gateway, which decides, injects the key and originates TLS
  gateway-plain  the same through a second mesh with `--insecure-plain-gateway`: the hop without TLS,
                 so the difference to gateway-mtls is what mutual TLS costs (with --no-plain: left out)
Contenders alternate within each round. For each: requests/s and latency (wrk, 1 and 16
connections; noise on a shared machine), CPU per request of every process involved (/proc: the
control plane, the sidecar's Envoy, and the gateway's `up` with its Envoy), and the TLS handshakes
the gateway made per request (connections are reused: about 0).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from extproc.testing.ports import free_port

from .contenders import HOST, KEY, ROOT, Contender, Stage, control_token, lua_script
from .measure import Processes, timed_requests
from .rounds import cpu_us_per, run_rounds, under_wrk, warm_up

GATEWAY_HOST = "gateway.llm.test"  # the provider only the egress gateway decides
GATEWAY = "llm-gateway/egress"
ROUTE = f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: behind-the-gateway
spec:
  host: {GATEWAY_HOST}
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig:
        model: qwen1.5-72b-chat
        apiKey: ${{YOUR_DASHSCOPE_API_KEY}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: behind-the-gateway
spec:
  host: {GATEWAY_HOST}
  gateways: [{GATEWAY}]
  rules:
  - backendRefs:
    - providerHost: {GATEWAY_HOST}
"""


class Mesh:
    """A sidecar (its control plane and its Envoy) and the egress gateway it sends to."""

    def __init__(self, stage: Stage, name: str, config: Path, plain: bool):
        token_file, sds_file = control_token(stage)
        control, ext_proc, gateway_port = free_port(), free_port(), free_port()
        self.sidecar_port, self.sidecar_admin, self.gateway_admin = free_port(), free_port(), free_port()
        insecure = ["--insecure-plain-gateway"] if plain else []
        upstream = ["--upstream-ca", stage.ca.cert_file, "--resolve", f"{HOST}=127.0.0.1:{stage.fake_port}",
                    "--resolve", f"{GATEWAY_HOST}=127.0.0.1:{stage.fake_port}"]
        env = {"YOUR_DASHSCOPE_API_KEY": KEY}
        self.gateway = stage.start(
            [sys.executable, "-m", "extproc", "up", "--config", config, "--gateway", GATEWAY,
             "--listen", f"127.0.0.1:{gateway_port}", "--admin", f"127.0.0.1:{self.gateway_admin}",
             "--metrics", "none", "--access-log", "none", "--concurrency", "1", *upstream, *insecure,
             *([] if plain else ["--control-plane", f"127.0.0.1:{control}", "--token-file", token_file])],
            f"gateway-{name}.log", env={**os.environ, **env}, cwd=ROOT)
        self.serve = stage.start(
            [sys.executable, "-m", "extproc", "serve", "--config", config, "--workers", "1",
             "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
             "--auth-token-file", token_file, "--metrics", "none", *upstream, *insecure,
             "--egress-gateway", f"{GATEWAY}=127.0.0.1:{gateway_port}"],
            f"serve-{name}.log", env={**os.environ, **env}, cwd=ROOT)
        boot = subprocess.run(
            [sys.executable, "-m", "extproc", "envoy-config", "--sidecar", "--control", f"127.0.0.1:{control}",
             "--ext-proc", f"127.0.0.1:{ext_proc}", "--listen", f"127.0.0.1:{self.sidecar_port}",
             "--admin", f"127.0.0.1:{self.sidecar_admin}", "--readiness", f"127.0.0.1:{free_port()}",
             "--access-log", "none", "--token-file", str(token_file), "--token-sds", str(sds_file)],
            capture_output=True, text=True, check=True, cwd=ROOT).stdout
        self.envoy = stage.start_envoy(f"sidecar-{name}", json.loads(boot))

    def contender(self, name: str, host: str, stage: Stage) -> Contender:
        """Requests for `host` through this mesh's sidecar; the processes read: all of this mesh's
        (the gateway's only where the host is its)."""
        pids = [self.serve.pid, self.envoy.pid] + ([self.gateway.pid] if host == GATEWAY_HOST else [])
        contender = Contender(name, self.sidecar_port, {"all": Processes.of(*pids)}, self.serve)
        contender.script = stage.work / f"load-{name}.lua"
        contender.script.write_text(lua_script("/", host, {"messages": [{"role": "user", "content": "Hi"}]}))
        return contender

    def handshakes(self) -> int:
        """TLS handshakes the gateway's listener completed so far."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.gateway_admin}/stats?filter=ssl.handshake",
                                    timeout=5) as r:
            return sum(int(v) for name, _, v in (line.partition(": ") for line in r.read().decode().splitlines())
                       if name.startswith("listener.") and v.strip().isdigit())


def wait_serving(stage: Stage, contender: Contender, host: str, timeout: float = 90) -> None:
    """Until the contender answers a request for `host` (the gateway waits for its certificate)."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}]}).encode()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            timed_requests(contender.port, host, body, 1)
            return
        except (OSError, AssertionError, http.client.HTTPException):
            time.sleep(0.3)
    raise RuntimeError(f"{contender.name}: {host} is not served on port {contender.port}{stage.logs()}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks gateway-hop", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=8, help="per wrk run")
    parser.add_argument("--connections", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--no-plain", action="store_true", help="leave out the plain-HTTP hop (one mesh fewer)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    args = parser.parse_args(argv)
    with Stage("llm-gateway-bench-hop-", hosts=(HOST, GATEWAY_HOST)) as stage:
        config = stage.config_dir("config", ("02-gateway.yaml", ROUTE))
        meshes = {"mtls": Mesh(stage, "mtls", config, plain=False)}
        if not args.no_plain:
            meshes["plain"] = Mesh(stage, "plain", config, plain=True)
        contenders = {"sidecar": meshes["mtls"].contender("sidecar", HOST, stage),
                      "gateway-mtls": meshes["mtls"].contender("gateway-mtls", GATEWAY_HOST, stage)}
        if "plain" in meshes:
            contenders["gateway-plain"] = meshes["plain"].contender("gateway-plain", GATEWAY_HOST, stage)
        for c in contenders.values():
            wait_serving(stage, c, HOST if c.name == "sidecar" else GATEWAY_HOST)
        warm_up(contenders.values(), 2)
        handshakes_before = meshes["mtls"].handshakes()

        def line(r: int, c: Contender, connections: int, done: list[dict]) -> str:
            out = done[-1]
            return (f"round {r} {c.name:13s} c={connections:2d}: {out['rps']:7.0f} req/s  p50 {out['p50_ms']:6.2f} ms  "
                    f"CPU {cpu_us_per([out], 'all'):7.1f} µs/request  errors {out['errors']}")

        runs = run_rounds(contenders, args.rounds, under_wrk(args.seconds), passes=tuple(args.connections), line=line)
        sent = sum(r["requests"] for by_c in runs["gateway-mtls"].values() for r in by_c)
        handshakes = meshes["mtls"].handshakes() - handshakes_before
    summary = summarize(runs, handshakes, sent)
    args.out.mkdir(exist_ok=True)
    (args.out / "gateway-hop.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0 if all(errors == 0 for errors in summary["errors"].values()) else 1


def summarize(runs: dict, handshakes: int, sent: int) -> dict:
    """Per contender and connections: medians of requests/s and p50, CPU per request over every
    run (all processes), the minimum too; the gateway's handshakes per request; the ratios."""
    out: dict = {"contenders": {}, "errors": {}}
    for name, by_c in runs.items():
        out["errors"][name] = sum(r["errors"] for rs in by_c.values() for r in rs)
        out["contenders"][name] = {str(c): {
            "rps_median": round(statistics.median(r["rps"] for r in rs), 1),
            "p50_ms_median": round(statistics.median(r["p50_ms"] for r in rs), 3),
            "cpu_us_per_request": round(cpu_us_per(rs, "all"), 1),
            "cpu_us_per_request_min": round(min(cpu_us_per([r], "all") for r in rs), 1)} for c, rs in by_c.items()}
    sidecar = out["contenders"]["sidecar"]
    for name in ("gateway-mtls", "gateway-plain"):
        if name in out["contenders"]:
            out[f"{name}_over_sidecar"] = {c: {
                "cpu": round(v["cpu_us_per_request"] / sidecar[c]["cpu_us_per_request"], 2),
                "added_p50_ms": round(v["p50_ms_median"] - sidecar[c]["p50_ms_median"], 3)}
                for c, v in out["contenders"][name].items()}
    out["gateway_tls_handshakes_per_request"] = round(handshakes / max(sent, 1), 6)
    out["gateway_tls_handshakes"], out["gateway_requests"] = handshakes, sent
    return out
