"""The request-path cost of how Envoy reaches the control plane (issue 15): CPU time per request,
read from /proc, of the control plane and of Envoy, for

  before    the gateway as it was before authentication (TCP on loopback, no token): a git
            revision exported to a temporary directory (--before, default the branch's base)
  uds       `extproc up` now: Unix sockets in a private directory (the default)
  tcp-token `extproc up` over TCP on loopback with a bearer token checked on every stream

and the per-stream check itself (StaticToken, a TokenReview cache hit), timed in-process.
Variants alternate within each round, so drift on a shared machine hits all alike; throughput
is printed but is noise there. Usage: scripts/_venv.sh python scripts/bench_auth.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import HOST, KEY, MESSAGES, cpu_seconds, free_port, lua_script, wait_until_serving  # noqa: E402

from extproc.demo.ca import ThrowawayCA  # noqa: E402
from extproc.testing.envoy_fake import start_envoy_fake  # noqa: E402
from extproc.testing.load import run_wrk  # noqa: E402
from extproc.demo.run import manifests_dir  # noqa: E402
from extproc.ops.up import envoy_binary  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# `up` with a token: not a command-line option (over TCP, `serve` and a separately run Envoy are
# the supported form); the runner's option for tests and measurements
TCP_UP = ("import asyncio, sys; from extproc.ops.up import UpOptions, run_up; "
          "from extproc.cli.main import build_parser; from extproc.cli.flags import upstream_options; a = build_parser().parse_args(['up', *sys.argv[1:]]); "
          "sys.exit(asyncio.run(run_up(UpOptions(config=a.config, listen=a.listen, admin=a.admin, upstream=upstream_options(a), "
          "metrics=None, access_log=None, concurrency=a.concurrency, tcp_token='t' * 43))))")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def start(variant: str, before_src: Path, config: Path, ca: ThrowawayCA, fake_port: int, work: Path):
    port = free_port()
    args = ["--config", str(config), "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{free_port()}",
            "--concurrency", "1", "--upstream-ca", str(ca.cert_file), "--resolve", f"{HOST}=127.0.0.1:{fake_port}"]
    env = {**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY}
    if variant == "tcp-token":
        cmd = [sys.executable, "-c", TCP_UP, *args]
    else:
        cmd = [sys.executable, "-m", "extproc", "up", *args, "--metrics", "none", "--access-log", "none"]
    if variant == "before":
        env["PYTHONPATH"] = str(before_src)
    process = subprocess.Popen(cmd, env=env, cwd=before_src if variant == "before" else ROOT,
                               stdout=(work / f"{variant}.log").open("wb"), stderr=subprocess.STDOUT)
    wait_until_serving(port)
    (envoy,) = children(process.pid)
    return process, port, envoy


def check_costs() -> dict[str, float]:
    """µs per stream of the authenticator's cache lookup."""
    from extproc.dataplane.authentication import StaticToken, TokenReviewAuthenticator, cache_key
    from extproc.policy.caller import Caller

    static = StaticToken("s" * 43)
    review = TokenReviewAuthenticator(lambda t, a: None)
    token = "x" * 900  # about a projected ServiceAccount token's length
    review._cache[cache_key(token)] = (Caller("ns", "sa"), time.time() + 3600)
    n = 200_000
    return {"static_token_us": timeit.timeit(lambda: static.cached("s" * 43), number=n) / n * 1e6,
            "token_review_hit_us": timeit.timeit(lambda: review.cached(token), number=n) / n * 1e6}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=1,
                        help="wrk connections (default 1: no batching of messages, so CPU per request depends "
                             "least on how busy the machine is)")
    parser.add_argument("--before", default=subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT,
                                                           capture_output=True, text=True).stdout.strip() or "HEAD")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-auth-"))
    before_src = work / "before"
    before_src.mkdir()
    archive = subprocess.run(["git", "archive", args.before, "extproc"], cwd=ROOT, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
    ca = ThrowawayCA(work / "pki")
    fake_port = free_port()
    fake = start_envoy_fake(envoy_binary(), ca, [HOST], fake_port, free_port(), work)
    config = work / "config"
    config.mkdir()
    shutil.copy(manifests_dir() / "01-LLMProvider.yaml", config)
    script = work / "load.lua"
    script.write_text(lua_script("/", HOST, {"messages": MESSAGES}))
    variants = ["before", "uds", "tcp-token"]
    running = {}
    results = {v: {"control_us": [], "envoy_us": [], "rps": []} for v in variants}
    try:
        for v in variants:
            running[v] = start(v, before_src, config, ca, fake_port, work)
            run_wrk(running[v][1], script, 4, 2)  # warm up
        for r in range(args.rounds):
            for v in variants[r % 3:] + variants[:r % 3]:
                process, port, envoy = running[v]
                c0, e0 = cpu_seconds(process.pid), cpu_seconds(envoy)
                out = run_wrk(port, script, args.connections, args.seconds)
                assert out["errors"] == 0, (v, out)
                results[v]["control_us"].append((cpu_seconds(process.pid) - c0) / out["requests"] * 1e6)
                results[v]["envoy_us"].append((cpu_seconds(envoy) - e0) / out["requests"] * 1e6)
                results[v]["rps"].append(out["rps"])
                print(f"round {r + 1} {v:9s}: {out['requests']:6d} requests, control plane "
                      f"{results[v]['control_us'][-1]:6.1f} µs/request, Envoy {results[v]['envoy_us'][-1]:6.1f} µs/request, "
                      f"{out['rps']:6.0f} req/s (noise)", flush=True)
    finally:
        for process, _, _ in running.values():
            process.send_signal(signal.SIGTERM)
        for process, _, _ in running.values():
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)
    # the median, and the minimum (interference from other processes only ever adds CPU time)
    summary = {v: {**{k: round(statistics.median(x), 1) for k, x in m.items()},
                   **{f"{k}_min": round(min(x), 1) for k, x in m.items() if k != "rps"}} for v, m in results.items()}
    for v in variants:
        s, base = summary[v], summary["before"]
        for suffix in ("", "_min"):
            s[f"total_us{suffix}"] = round(s[f"control_us{suffix}"] + s[f"envoy_us{suffix}"], 1)
            s[f"total_vs_before{suffix}"] = round(s[f"total_us{suffix}"] / (base[f"control_us{suffix}"] +
                                                                             base[f"envoy_us{suffix}"]), 3)
    summary["per_stream_check"] = {k: round(x, 3) for k, x in check_costs().items()}
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
