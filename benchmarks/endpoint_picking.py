"""Load-aware endpoint picking against Envoy's own balancing (issue 25):
`python -m benchmarks endpoint-picking [--seconds S] [--load 0.8]`, part of scripts/bench
(`--endpoint-picking`).

Four simulated model servers (`extproc.demo.model_server`: N slots, a queue, time to first
token growing with the prompt's uncached length, shrinking on a prefix-cache hit, a decode time
per output token, the load in vLLM's metric names) take the same skewed workload, in turn,
behind three contenders, each with fresh servers (cold caches):
- `round_robin`: Envoy alone, a static cluster of the four, round robin;
- `least_request`: the same, least request (Envoy's default choice of two);
- `picker`: `extproc up` with an InferencePool of the four: the gateway picks per request.

The workload: open-loop Poisson arrivals at `--load` (0.8) of the servers' capacity without
cache hits; 70 % of the prompts ask about one of 12 shared documents (popularity skewed, Zipf),
30 % are short chats; 16 to 48 output tokens; every request streamed. A server's prefix cache
holds about three documents: round robin spreads every document everywhere and thrashes it.
Reported per contender: time to first token p50/p90/p99, requests completed per second, errors.
Goal: the picker's p90 at most 0.6 x round robin's, with no loss of throughput. Writes the table
to stdout, JSON and a PNG chart to bench-results/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from extproc.demo.model_server import ModelServer, ServerSpec
from extproc.ops.up import envoy_binary

from .measure import percentile, wait_http

ROOT = Path(__file__).resolve().parent.parent
SERVERS = 4
SPEC = ServerSpec(slots=4, prefill_base_s=0.005, prefill_per_token_s=0.00006, decode_s=0.004,
                  kv_capacity_tokens=12_000, cache_blocks=200, max_loras=2)
HOST = "pool.bench"
DOCUMENTS = 12


@dataclass
class Request:
    at: float  # seconds after the start
    prompt: str
    max_tokens: int


def workload(seconds: float, rate: float, seed: int = 25) -> list[Request]:
    """The skewed workload: Poisson arrivals, shared documents by Zipf popularity, short chats."""
    rng = random.Random(seed)
    words = ["contract", "clause", "party", "shall", "notice", "term", "payment", "delivery", "warranty", "liability",
             "model", "server", "cache", "token", "prefix", "queue", "latency", "budget", "route", "provider"]
    documents = [" ".join(rng.choice(words) for _ in range(rng.randint(1000, 2000))) for _ in range(DOCUMENTS)]
    weights = [1 / (i + 1) ** 1.1 for i in range(DOCUMENTS)]
    out, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return out
        if rng.random() < 0.7:
            document = rng.choices(documents, weights)[0]
            prompt = f"{document}\n\nQuestion {rng.randint(0, 10**9)}: what does it say about {rng.choice(words)}?"
        else:
            prompt = " ".join(rng.choice(words) for _ in range(rng.randint(30, 150)))
        out.append(Request(t, prompt, rng.randint(16, 48)))


def service_s(request: Request, spec: ServerSpec = SPEC) -> float:
    """A request's time at a server without a cache hit."""
    return spec.prefill_base_s + spec.prefill_per_token_s * len(request.prompt) / 4 + spec.decode_s * request.max_tokens


def capacity_rps(spec: ServerSpec = SPEC, servers: int = SERVERS) -> float:
    """Requests per second the servers finish without cache hits, for this workload's mix."""
    sample = workload(200, 10, seed=1)
    mean = sum(map(service_s, sample)) / len(sample)
    return servers * spec.slots / mean


# --- the model servers' own process ------------------------------------------------------------

def serve_main(argv: list[str]) -> int:
    """`python -m benchmarks model-servers N`: N simulated servers on 127.0.0.21.. until SIGTERM;
    their addresses as one JSON line on stdout."""
    count = int(argv[0]) if argv else SERVERS

    async def run() -> None:
        servers = [await ModelServer(f"ms{i}", SPEC, host=f"127.0.0.{21 + i}").start() for i in range(count)]
        print(json.dumps([s.address for s in servers]), flush=True)
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for s in servers:
            await s.stop()
        print(json.dumps([{"name": s.name, "requests": len(s.seen), "prefix_hits": sum(1 for x in s.seen
                                                                                      if x.cached_blocks)}
                          for s in servers]), flush=True)

    asyncio.run(run())
    return 0


# --- contenders --------------------------------------------------------------------------------

class Stage:
    def __init__(self) -> None:
        self.work = Path(tempfile.mkdtemp(prefix="bench-picking-"))
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], log: str, **popen) -> subprocess.Popen:
        with (self.work / log).open("wb") as out:
            process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, **popen)
        self.procs.append(process)
        return process

    def servers(self, name: str) -> tuple[subprocess.Popen, list[str]]:
        process = subprocess.Popen([sys.executable, "-m", "benchmarks", "model-servers", str(SERVERS)],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=ROOT)
        self.procs.append(process)
        assert process.stdout is not None
        line = process.stdout.readline()
        if not line:
            raise RuntimeError(f"the model servers of {name} did not start")
        return process, json.loads(line)

    def server_stats(self) -> list[dict]:
        """The servers' own counts (requests, prefix-cache hits), told when they stop."""
        for process in self.procs:
            if process.stdout is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                line = process.stdout.readline()
                process.wait(15)
                return json.loads(line) if line else []
        return []

    def close(self) -> None:
        for process in self.procs:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.procs:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def envoy_config(listen: int, admin: int, endpoints: list[str], policy: str) -> dict:
    """Envoy alone in front of the servers: a static cluster balanced by `policy`."""
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "bench", "codec_type": "AUTO",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
               "match": {"prefix": "/"}, "route": {"cluster": "servers", "timeout": "300s"}}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    lb_endpoints = [{"endpoint": {"address": {"socket_address": {"address": e.rpartition(":")[0],
                                                                  "port_value": int(e.rpartition(":")[2])}}}}
                    for e in endpoints]
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "bench", "address": {"socket_address": {"address": "127.0.0.1",
                                                                               "port_value": listen}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [{"name": "servers", "type": "STATIC", "lb_policy": policy, "connect_timeout": "5s",
                              "circuit_breakers": {"thresholds": [{"max_requests": 100_000,
                                                                   "max_pending_requests": 100_000}]},
                              "load_assignment": {"cluster_name": "servers",
                                                  "endpoints": [{"lb_endpoints": lb_endpoints}]}}]}}


def start_contender(stage: Stage, name: str, endpoints: list[str]) -> int:
    """The contender's listening port, once it answers."""
    port, admin = free_port(), free_port()
    if name == "picker":
        config = stage.work / "picker-config"
        config.mkdir()
        (config / "pool.yaml").write_text(f"""apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: bench
  annotations:
    llm-gateway.dev/endpoints: "{', '.join(endpoints)}"
spec:
  selector: {{matchLabels: {{app: bench}}}}
  targetPorts: [{{number: 8000}}]
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: bench
spec:
  host: {HOST}
  rules:
  - backendRefs:
    - backendRef: {{group: inference.networking.k8s.io, kind: InferencePool, name: bench}}
""")
        stage.start([sys.executable, "-m", "extproc", "up", "--config", str(config), "--listen", f"127.0.0.1:{port}",
                     "--admin", f"127.0.0.1:{admin}", "--metrics", "none", "--access-log", "none"],
                    "gateway.log", cwd=ROOT)
    else:
        policy = {"round_robin": "ROUND_ROBIN", "least_request": "LEAST_REQUEST"}[name]
        (stage.work / f"{name}.json").write_text(json.dumps(envoy_config(port, admin, endpoints, policy)))
        stage.start([envoy_binary(), "-c", str(stage.work / f"{name}.json"), "--disable-hot-restart",
                     "--log-level", "error", "--concurrency", "1"], f"{name}.log")
    wait_http(f"http://127.0.0.1:{admin}/ready", 60)
    deadline = time.monotonic() + 60
    while asyncio.run(one(port, Request(0, "ready?", 1))).status != 200:  # its clusters and routes in place
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} does not answer (see {stage.work})")
        time.sleep(0.2)
    return port


# --- the client ------------------------------------------------------------------------------------

@dataclass
class Outcome:
    ttft_s: float | None
    done_s: float | None
    status: int


async def one(port: int, request: Request) -> Outcome:
    body = json.dumps({"model": "base-model", "stream": True, "max_tokens": request.max_tokens,
                       "messages": [{"role": "user", "content": request.prompt}]}).encode()
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return Outcome(None, None, 0)
    try:
        writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\ncontent-type: application/json\r\n"
                     f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode() + body)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        ttft = None
        seen = b""
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                break
            if ttft is None:
                seen += chunk
                if b"data:" in seen:
                    ttft = time.perf_counter() - start
        done = time.perf_counter() - start
        return Outcome(ttft if status == 200 else None, done if status == 200 else None, status)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        return Outcome(None, None, 0)
    finally:
        writer.close()


async def drive(port: int, requests: list[Request]) -> list[tuple[Request, Outcome]]:
    begin = time.perf_counter()

    async def at(request: Request) -> tuple[Request, Outcome]:
        delay = request.at - (time.perf_counter() - begin)
        if delay > 0:
            await asyncio.sleep(delay)
        return request, await one(port, request)

    return list(await asyncio.gather(*(at(r) for r in requests)))


def summarize(results: list[tuple[Request, Outcome]], seconds: float, warmup_s: float) -> dict:
    measured = [(r, o) for r, o in results if r.at >= warmup_s]
    ttfts = [o.ttft_s * 1000 for _, o in measured if o.ttft_s is not None]
    completed = [o for _, o in measured if o.done_s is not None]
    return {"requests": len(measured), "completed": len(completed), "errors": len(measured) - len(completed),
            "completed_rps": round(len(completed) / max(seconds - warmup_s, 1e-9), 2),
            "ttft_ms": {q: round(percentile(ttfts, q / 100), 1) if ttfts else None for q in (50, 90, 99)}}


def chart(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["contenders"])
    colors = {"round_robin": "#888888", "least_request": "#9bbb59", "picker": "#2a7ab0"}
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.25
    for i, q in enumerate((50, 90, 99)):
        values = [summary["contenders"][n]["ttft_ms"][str(q)] or 0 for n in names]
        bars = left.bar([x + (i - 1) * width for x in range(len(names))], values, width, label=f"p{q}")
        left.bar_label(bars, fmt="%.0f", fontsize=7)
    left.set_xticks(range(len(names)), names)
    left.set_ylabel("ms")
    left.set_title("time to first token (lower is better)")
    left.legend()
    bars = right.bar(names, [summary["contenders"][n]["completed_rps"] for n in names],
                     color=[colors.get(n, "#666666") for n in names])
    right.bar_label(bars, fmt="%.1f")
    right.set_title("requests completed per second")
    fig.suptitle(f"{SERVERS} simulated model servers, skewed workload at {summary['load']:.0%} of capacity "
                 f"({summary['rate_rps']:.0f} requests/s, {summary['seconds']:.0f} s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks endpoint-picking", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=60.0, help="arrivals per contender (default 60)")
    parser.add_argument("--load", type=float, default=0.8, help="of the servers' capacity (default 0.8)")
    parser.add_argument("--out", default=str(ROOT / "bench-results"), help="where the JSON and PNG go")
    parser.add_argument("--contenders", default="round_robin,least_request,picker")
    args = parser.parse_args(argv)
    rate = capacity_rps() * args.load
    requests = workload(args.seconds, rate)
    warmup_s = min(10.0, args.seconds / 4)
    summary: dict = {"seconds": args.seconds, "load": args.load, "rate_rps": round(rate, 1), "servers": SERVERS,
                     "spec": asdict(SPEC), "warmup_s": warmup_s, "cores": os.cpu_count(), "contenders": {}}
    print(f"{len(requests)} requests over {args.seconds:.0f} s ({rate:.1f}/s, {args.load:.0%} of capacity); "
          f"the first {warmup_s:.0f} s warm up, not counted", flush=True)
    for name in args.contenders.split(","):
        stage = Stage()
        try:
            _, endpoints = stage.servers(name)
            port = start_contender(stage, name, endpoints)
            results = asyncio.run(drive(port, requests))
            stats = stage.server_stats()
        finally:
            stage.close()
        summary["contenders"][name] = s = summarize(results, args.seconds, warmup_s)
        s["per_server"] = stats
        s["prefix_hit_rate"] = round(sum(x["prefix_hits"] for x in stats) / max(sum(x["requests"] for x in stats), 1),
                                     3)
        print(f"  {name:14s} TTFT p50 {s['ttft_ms'][50]} ms  p90 {s['ttft_ms'][90]} ms  p99 {s['ttft_ms'][99]} ms  "
              f"{s['completed_rps']} completed/s  {s['errors']} errors  prefix-cache hits {s['prefix_hit_rate']:.0%}  "
              f"per server {[x['requests'] for x in stats]}", flush=True)
    summary = json.loads(json.dumps(summary))  # percentiles' keys as JSON has them
    contenders = summary["contenders"]
    if "picker" in contenders and "round_robin" in contenders:
        rr, picker = contenders["round_robin"], contenders["picker"]
        ratio = picker["ttft_ms"]["90"] / rr["ttft_ms"]["90"] if rr["ttft_ms"]["90"] else None
        summary["p90_ratio_vs_round_robin"] = round(ratio, 3) if ratio is not None else None
        summary["throughput_ratio_vs_round_robin"] = round(picker["completed_rps"] / max(rr["completed_rps"], 1e-9), 3)
        met = ratio is not None and ratio <= 0.6 and summary["throughput_ratio_vs_round_robin"] >= 0.98
        print(f"picker p90 / round robin p90 = {summary['p90_ratio_vs_round_robin']} (goal <= 0.6); throughput "
              f"ratio {summary['throughput_ratio_vs_round_robin']}: goal {'met' if met else 'NOT met'}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "endpoint-picking.json").write_text(json.dumps(summary, indent=2))
    try:
        chart(summary, out / "endpoint-picking.png")
        print(f"wrote {out / 'endpoint-picking.json'} and {out / 'endpoint-picking.png'}")
    except ImportError:
        print(f"wrote {out / 'endpoint-picking.json'} (no matplotlib: no chart)")
    return 0
