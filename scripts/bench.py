"""The benchmark behind scripts/bench: the gateway against bare Envoy and LiteLLM, in one run.

Every contender sends to the same fast fake provider (an Envoy answering a fixed chat completion,
`extproc/demo/envoy_fake.py`), reached by its host name through --resolve:
  bare      Envoy with a static route: the same TLS origination, auth header and path rewrite,
            no ext_proc (the limit we measure against)
  gateway   `extproc up` with everything a user gets by default (routing, body rewrite, token
            accounting, metrics, access log)
  litellm   LiteLLM proxy, one worker, in its own virtual environment (made by this script),
            sending over plain HTTP to the same fake (its TLS trust setup is awkward)
Contenders alternate within each round, so drift hits all alike. Load comes from wrk.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from extproc.demo.ca import ThrowawayCA
from extproc.demo.envoy_fake import STREAM_HEADER, start_envoy_fake
from extproc.demo.load import run_wrk
from extproc.demo.run import manifests_dir
from extproc.envoy_config import HostPort, UpstreamOptions, provider_cluster
from extproc.runner import envoy_binary

ROOT = Path(__file__).resolve().parent.parent
HOST = "dashscope.aliyuncs.com"
PATH = "/compatible-mode/v1/chat/completions"
KEY = "sk-" + os.urandom(32).hex()  # the provider key, and LiteLLM's master key
MESSAGES = [{"role": "user", "content": "Please introduce yourself."}]
TARGETS = {"throughput_ratio_16": 0.75, "added_p50_ms_1": 0.5, "litellm_ratio_16": 20.0, "cpu_us_per_request": 150.0,
           "memory_growth_pct": 10.0}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def bare_envoy_config(listen: int, admin: int, fake_port: int, ca_file: Path) -> dict:
    """The limit: Envoy alone doing what the gateway asks of it, with the config written by hand."""
    cluster = provider_cluster("provider", HOST, UpstreamOptions(ca_file=str(ca_file), resolve={HOST: HostPort("127.0.0.1", fake_port)}))
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
           "stat_prefix": "bare", "codec_type": "AUTO",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
               "match": {"prefix": "/"},
               "route": {"cluster": "provider", "prefix_rewrite": PATH, "host_rewrite_literal": HOST, "timeout": "300s"},
               "request_headers_to_add": [{"header": {"key": "authorization", "value": f"Bearer {KEY}"},
                                           "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "bare", "address": {"socket_address": {"address": "127.0.0.1", "port_value": listen}},
                               "per_connection_buffer_limit_bytes": 8 << 20,
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [cluster]}}


def lua_script(path: str, host: str, body: dict) -> str:
    payload = json.dumps(body).replace("'", "\\'")
    return (f'wrk.method = "POST"\nwrk.path = "{path}"\nwrk.body = \'{payload}\'\n'
            f'wrk.headers["Content-Type"] = "application/json"\nwrk.headers["Host"] = "{host}"\n'
            f'wrk.headers["Authorization"] = "Bearer {KEY}"\n')


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed_requests(port: int, host: str, body: bytes, n: int, headers: dict | None = None,
                   first_byte: bool = False) -> list[float]:
    """Sequential requests on one keep-alive connection: ms to the first body byte, or to the end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        conn.request("POST", "/", body=body, headers={"Host": host, "Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if first_byte:
            resp.read1(1)
            times.append((time.perf_counter() - start) * 1000)
            resp.read()
        else:
            resp.read()
            times.append((time.perf_counter() - start) * 1000)
        assert resp.status == 200, resp.status
    conn.close()
    return times


def ensure_litellm(venv: Path) -> Path | None:
    litellm = venv / "bin" / "litellm"
    if litellm.exists():
        return litellm
    print(f"installing LiteLLM into {venv} (once; a few minutes)...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    result = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "litellm[proxy]"], capture_output=True, text=True)
    if result.returncode != 0 or not litellm.exists():
        print(f"LiteLLM could not be installed; it is left out:\n{result.stderr[-2000:]}")
        return None
    return litellm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10, help="per wrk run")
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--memory-requests", type=int, default=100_000)
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    parser.add_argument("--budgets", action="store_true",
                        help="the budgets variant instead: CPU per request with and without an LLMTokenRateLimit "
                             "matching every request (in process, and through Redis), and the overshoot bound")
    args = parser.parse_args()
    args.out.mkdir(exist_ok=True)
    if args.budgets:
        return budgets_main(args)
    work = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-"))
    procs: list[subprocess.Popen] = []
    envoy = envoy_binary()
    ca = ThrowawayCA(work / "pki")
    fake_port, fake_plain = free_port(), free_port()
    fake = start_envoy_fake(envoy, ca, [HOST], fake_port, free_port(), work, plain_port=fake_plain)
    ports: dict[str, int] = {}
    pids: dict[str, int] = {}
    try:
        # bare Envoy
        ports["bare"] = free_port()
        (work / "bare.json").write_text(json.dumps(bare_envoy_config(ports["bare"], free_port(), fake_port, ca.cert_file)))
        procs.append(subprocess.Popen([envoy, "-c", str(work / "bare.json"), "--disable-hot-restart", "--log-level", "error"],
                                      stdout=subprocess.DEVNULL, stderr=(work / "bare.log").open("wb")))
        # the gateway, with its defaults (metrics, access log), on the seed's first provider
        config = work / "config"
        config.mkdir()
        shutil.copy(manifests_dir() / "01-LLMProvider.yaml", config)
        ports["gateway"], metrics = free_port(), free_port()
        gateway = subprocess.Popen(
            [sys.executable, "-m", "extproc", "up", "--config", str(config), "--listen", f"127.0.0.1:{ports['gateway']}",
             "--admin", f"127.0.0.1:{free_port()}", "--metrics", f"127.0.0.1:{metrics}",
             "--access-log", str(work / "access.log"), "--upstream-ca", str(ca.cert_file),
             "--resolve", f"{HOST}=127.0.0.1:{fake_port}"],
            env={**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY}, stdout=(work / "gateway.log").open("wb"),
            stderr=subprocess.STDOUT)
        procs.append(gateway)
        pids["gateway"] = gateway.pid
        # LiteLLM, one worker
        litellm = None if args.no_litellm else ensure_litellm(args.out / ".litellm-venv")
        if litellm:
            ports["litellm"] = free_port()
            (work / "litellm.yaml").write_text(json.dumps({"model_list": [{
                "model_name": "qwen1.5-72b-chat",
                "litellm_params": {"model": "openai/qwen1.5-72b-chat", "api_key": KEY,
                                   "api_base": f"http://127.0.0.1:{fake_plain}/compatible-mode/v1"}}],
                "litellm_settings": {"telemetry": False}, "general_settings": {"master_key": KEY}}))
            procs.append(subprocess.Popen([str(litellm), "--config", str(work / "litellm.yaml"), "--port", str(ports["litellm"]),
                                           "--num_workers", "1"], stdout=(work / "litellm.log").open("wb"),
                                          stderr=subprocess.STDOUT, env={**os.environ, "LITELLM_LOG": "ERROR"}))
        for name, port in ports.items():
            url = f"http://127.0.0.1:{port}/health/liveliness" if name == "litellm" else None
            if url:
                wait_http(url, 180, procs[-1])
            else:
                wait_until_serving(port)
        scripts = {name: work / f"{name}.lua" for name in ports}
        scripts["bare"].write_text(lua_script("/", HOST, {"messages": MESSAGES}))
        scripts["gateway"].write_text(lua_script("/", HOST, {"messages": MESSAGES}))
        if "litellm" in ports:
            scripts["litellm"].write_text(lua_script("/v1/chat/completions", f"127.0.0.1:{ports['litellm']}",
                                                     {"model": "qwen1.5-72b-chat", "messages": MESSAGES}))
        # warm up everyone
        for name in ports:
            run_wrk(ports[name], scripts[name], 4, 3)

        runs: dict[str, dict[int, list[dict]]] = {name: {1: [], 16: []} for name in ports}
        cpu = {"seconds": 0.0, "requests": 0}
        names = list(ports)
        for r in range(args.rounds):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate who goes first
            for connections in (1, 16):
                for name in order:
                    before = cpu_seconds(pids["gateway"]) if name == "gateway" and connections == 16 else None
                    result = run_wrk(ports[name], scripts[name], connections, args.seconds)
                    if before is not None:
                        cpu["seconds"] += cpu_seconds(pids["gateway"]) - before
                        cpu["requests"] += result["requests"]
                    runs[name][connections].append(result)
                    print(f"round {r + 1} {name:8s} c={connections:2d}: {result['rps']:8.0f} req/s  "
                          f"p50 {result['p50_ms']:.2f} ms  p99 {result['p99_ms']:.2f} ms  errors {result['errors']}",
                          flush=True)

        # the gateway's memory over many requests, after warm-up
        rss_before = rss_mib(pids["gateway"])
        sent = 0
        while sent < args.memory_requests:
            sent += run_wrk(ports["gateway"], scripts["gateway"], 16, 10)["requests"]
        rss_after = rss_mib(pids["gateway"])

        # added time to the first event of a streamed answer, and added latency of a 1 MiB body
        stream_body = json.dumps({"messages": MESSAGES, "stream": True}).encode()
        ttfb = {n: statistics.median(timed_requests(ports[n], HOST, stream_body, 300, {STREAM_HEADER: "1"}, True))
                for n in ("bare", "gateway")}
        big = json.dumps({"messages": [{"role": "user", "content": "x" * (1 << 20)}]}).encode()
        big_ms = {n: statistics.median(timed_requests(ports[n], HOST, big, 40)) for n in ("bare", "gateway")}

        summary = summarize(runs, cpu, rss_before, rss_after, sent, ttfb, big_ms, "litellm" in ports)
        report(summary, args.out)
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)


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


def summarize(runs, cpu, rss_before, rss_after, sent, ttfb, big_ms, with_litellm) -> dict:
    med = {name: {c: {k: statistics.median(r[k] for r in results) for k in ("rps", "p50_ms", "p99_ms")}
                  for c, results in by_c.items()} for name, by_c in runs.items()}
    gw, bare = med["gateway"], med["bare"]
    out = {
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "medians": med,
        "errors": {name: sum(r["errors"] for c in by_c.values() for r in c) for name, by_c in runs.items()},
        "ratios": {"gateway_over_bare_rps_1": gw[1]["rps"] / bare[1]["rps"],
                   "gateway_over_bare_rps_16": gw[16]["rps"] / bare[16]["rps"]},
        "added_p50_ms_1": gw[1]["p50_ms"] - bare[1]["p50_ms"],
        "ext_proc_cpu_us_per_request": 1e6 * cpu["seconds"] / max(cpu["requests"], 1),
        "ext_proc_memory_mib": {"before": rss_before, "after": rss_after, "requests": sent,
                                "growth_pct": 100 * (rss_after - rss_before) / rss_before},
        "stream_first_event_ms": {**ttfb, "added": ttfb["gateway"] - ttfb["bare"]},
        "body_1mib_ms": {**big_ms, "added": big_ms["gateway"] - big_ms["bare"]},
        "litellm_transport": "plain HTTP to the same fake (its TLS trust is awkward to point at a throwaway CA)",
    }
    if with_litellm:
        out["ratios"]["gateway_over_litellm_rps_16"] = gw[16]["rps"] / med["litellm"][16]["rps"]
        out["ratios"]["gateway_over_litellm_rps_1"] = gw[1]["rps"] / med["litellm"][1]["rps"]
    return out


def report(s: dict, out: Path) -> None:
    cores = s["machine"]["cores"]
    print(f"\nmedians over the rounds, {cores} cores, {s['machine']['platform']}")
    print(f"{'contender':10s} {'conns':>5s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s}")
    for name, by_c in s["medians"].items():
        for c, m in by_c.items():
            print(f"{name:10s} {c:5d} {m['rps']:9.0f} {m['p50_ms']:8.2f} {m['p99_ms']:8.2f}")
    r = s["ratios"]
    checks = [
        ("gateway/bare req/s at 16 connections", r["gateway_over_bare_rps_16"], ">=", TARGETS["throughput_ratio_16"]),
        ("gateway added p50 at 1 connection (ms)", s["added_p50_ms_1"], "<=", TARGETS["added_p50_ms_1"]),
        ("ext_proc CPU per request (us)", s["ext_proc_cpu_us_per_request"], "<=", TARGETS["cpu_us_per_request"]),
        ("ext_proc memory growth (%)", s["ext_proc_memory_mib"]["growth_pct"], "<=", TARGETS["memory_growth_pct"]),
    ]
    if "gateway_over_litellm_rps_16" in r:
        checks.append(("gateway/LiteLLM req/s at 16 connections", r["gateway_over_litellm_rps_16"], ">=",
                       TARGETS["litellm_ratio_16"]))
    print(f"\n{'figure':42s} {'value':>9s}  target")
    for label, value, op, target in checks:
        ok = value >= target if op == ">=" else value <= target
        print(f"{label:42s} {value:9.2f}  {op} {target:g}  {'met' if ok else 'NOT met'}")
    print(f"gateway/bare req/s at 1 connection          {r['gateway_over_bare_rps_1']:9.2f}")
    mem = s["ext_proc_memory_mib"]
    print(f"ext_proc memory: {mem['before']:.1f} MiB -> {mem['after']:.1f} MiB over {mem['requests']} requests")
    st, big = s["stream_first_event_ms"], s["body_1mib_ms"]
    print(f"streamed answer, first event: bare {st['bare']:.2f} ms, gateway {st['gateway']:.2f} ms (+{st['added']:.2f} ms)")
    print(f"1 MiB body: bare {big['bare']:.2f} ms, gateway {big['gateway']:.2f} ms (+{big['added']:.2f} ms)")
    print(f"errors: {s['errors']}; LiteLLM: {s['litellm_transport']}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (out / f"bench-{stamp}.json").write_text(json.dumps(s, indent=2))
    chart(s, out / f"bench-{stamp}.png")
    print(f"\nwritten: {out / f'bench-{stamp}.json'}, {out / f'bench-{stamp}.png'}")


def chart(s: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(s["medians"])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, c in zip(axes, (1, 16)):
        values = [s["medians"][n][c]["rps"] for n in names]
        bars = ax.bar(names, values, color=["#888888", "#2a7ab0", "#c0504d"][:len(names)])
        ax.bar_label(bars, fmt="%.0f")
        ax.set_title(f"requests/s, {c} connection{'s' if c > 1 else ''} ({s['machine']['cores']} cores)")
    fig.suptitle("LLM gateway vs bare Envoy vs LiteLLM (same fake provider, medians)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


# --- the budgets variant (scripts/bench --budgets) ---------------------------------------------

BUDGET_YAML = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: bench}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules:
  - name: bound
    matches:
    - headers: {x-bench: {exact: bound}}
    tokens: BOUND_TOKENS
    per: 1h
  - name: everyone
    tokens: 1000000000000
    per: 1h
"""
BOUND_TOKENS = 70  # ten answers of the fake's 7 tokens


def _start_gateway(envoy_fake_port: int, ca: ThrowawayCA, work: Path, name: str, budget: bool,
                   redis_url: str | None) -> tuple[subprocess.Popen, int]:
    config = work / f"config-{name}"
    config.mkdir()
    shutil.copy(manifests_dir() / "01-LLMProvider.yaml", config)
    if budget:
        (config / "10-budget.yaml").write_text(BUDGET_YAML.replace("BOUND_TOKENS", str(BOUND_TOKENS)))
    port = free_port()
    args = [sys.executable, "-m", "extproc", "up", "--config", str(config), "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{free_port()}", "--metrics", f"127.0.0.1:{free_port()}",
            "--access-log", "none", "--upstream-ca", str(ca.cert_file),
            "--resolve", f"{HOST}=127.0.0.1:{envoy_fake_port}"]
    if redis_url:
        args += ["--redis", redis_url]
    process = subprocess.Popen(args, env={**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY},
                               stdout=(work / f"gateway-{name}.log").open("wb"), stderr=subprocess.STDOUT)
    return process, port


def _status(conn: http.client.HTTPConnection, headers: dict) -> tuple[int, float]:
    body = json.dumps({"messages": MESSAGES}).encode()
    conn.request("POST", "/", body=body, headers={"Host": HOST, "Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    resp.read()
    return resp.status, time.monotonic()


def measure_bound(port_a: int, port_b: int, trials: int) -> dict:
    """Overshoot between two instances on one Redis: one client alternates between them with a fresh
    key per trial, on a budget of BOUND_TOKENS (the fake's answers cost 7 tokens each), until both
    refuse. Tokens admitted beyond the budget, and the time from the answer that spent the budget
    to the last admission on either instance."""
    over_tokens, lag_s = [], []
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=30) for p in (port_a, port_b)]
    for trial in range(trials):
        headers = {"x-user-id": f"bound-{trial}-{os.urandom(4).hex()}", "x-bench": "bound"}
        for conn in conns:  # both instances have seen the key (the first-request case is documented apart)
            _status(conn, {**headers, "x-user-id": headers["x-user-id"] + "-warm"})
        admitted, spent_at, last_ok, refused = 0, None, None, [False, False]
        i = 0
        while not all(refused):
            status, at = _status(conns[i % 2], headers)
            if status == 200:
                admitted += 1
                last_ok = at
                if spent_at is None and admitted * 7 >= BOUND_TOKENS:
                    spent_at = at
            elif status == 429:
                refused[i % 2] = True
            i += 1
        over_tokens.append(admitted * 7 - BOUND_TOKENS)
        lag_s.append(max(0.0, (last_ok or 0) - (spent_at or last_ok or 0)))
    for conn in conns:
        conn.close()
    return {"trials": trials, "overshoot_tokens": {"median": statistics.median(over_tokens), "max": max(over_tokens)},
            "lag_s": {"median": statistics.median(lag_s), "max": max(lag_s)}}


def budgets_main(args) -> int:
    """CPU per request of the gateway's Python process (ext_proc, access log, Redis sync), a fixed
    number of requests per variant, alternating: no budget, a budget matching every request kept in
    process, the same through Redis; requests per second against bare Envoy as a ratio; and the
    overshoot bound between two instances on one Redis."""
    work = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-budgets-"))
    procs: list[subprocess.Popen] = []
    envoy = envoy_binary()
    ca = ThrowawayCA(work / "pki")
    fake_port = free_port()
    fake = start_envoy_fake(envoy, ca, [HOST], fake_port, free_port(), work)
    redis_port = free_port()
    try:
        procs.append(subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                       "--appendonly", "no", "--dir", str(work)], stdout=subprocess.DEVNULL))
        redis_url = f"redis://127.0.0.1:{redis_port}/0"
        ports: dict[str, int] = {"bare": free_port()}
        (work / "bare.json").write_text(json.dumps(bare_envoy_config(ports["bare"], free_port(), fake_port, ca.cert_file)))
        procs.append(subprocess.Popen([envoy, "-c", str(work / "bare.json"), "--disable-hot-restart", "--log-level",
                                       "error"], stdout=subprocess.DEVNULL, stderr=(work / "bare.log").open("wb")))
        pids: dict[str, int] = {}
        for name, budget, url in (("none", False, None), ("local", True, None), ("redis", True, redis_url),
                                  ("redis-b", True, redis_url)):
            process, ports[name] = _start_gateway(fake_port, ca, work, name, budget, url)
            procs.append(process)
            pids[name] = process.pid
        for port in ports.values():
            wait_until_serving(port)
        script = work / "load.lua"
        script.write_text(lua_script("/", HOST, {"messages": MESSAGES}) + 'wrk.headers["x-user-id"] = "bench-user"\n')
        measured = ["bare", "none", "local", "redis"]
        for name in measured:
            run_wrk(ports[name], script, 4, 3)  # warm up
        cpu = {n: {"seconds": 0.0, "requests": 0} for n in measured[1:]}
        rps: dict[str, list[float]] = {n: [] for n in measured}
        for r in range(args.rounds):
            order = measured[r % len(measured):] + measured[:r % len(measured)]
            for name in order:
                before = cpu_seconds(pids[name]) if name in pids else None
                result = run_wrk(ports[name], script, 16, args.seconds)
                if before is not None:
                    cpu[name]["seconds"] += cpu_seconds(pids[name]) - before
                    cpu[name]["requests"] += result["requests"]
                rps[name].append(result["rps"])
                print(f"round {r + 1} {name:6s}: {result['rps']:8.0f} req/s  errors {result['errors']}", flush=True)
        bound = measure_bound(ports["redis"], ports["redis-b"], 20)
        out = {
            "cpu_us_per_request": {n: 1e6 * c["seconds"] / max(c["requests"], 1) for n, c in cpu.items()},
            "requests_measured": {n: c["requests"] for n, c in cpu.items()},
            "rps_over_bare": {n: statistics.median(rps[n]) / statistics.median(rps["bare"]) for n in measured[1:]},
            "bound": bound,
        }
        print(json.dumps(out, indent=2))
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (args.out / f"bench-budgets-{stamp}.json").write_text(json.dumps(out, indent=2))
        return 0
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                p.kill()
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
