"""The request-path cost of how Envoy reaches the control plane (issue 15): CPU time per request,
read from /proc, of the control plane and of Envoy, for

  before    the gateway as it was before authentication (TCP on loopback, no token): a git
            revision exported to a temporary directory (--before, default the branch's base)
  uds       `extproc up` now: Unix sockets in a private directory (the default)
  tcp-token `extproc up` over TCP on loopback with a bearer token checked on every stream

and the per-stream check itself (StaticToken, a TokenReview cache hit), timed in-process.
Variants alternate within each round, so drift on a shared machine hits all alike; throughput
is printed but is noise there. Usage: `python -m benchmarks auth [--rounds 3]` (or
`.venv/bin/python scripts/bench_auth.py`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import timeit

from extproc.testing.load import run_wrk

from .contenders import ROOT, Contender, Stage, start_gateway, write_script
from .measure import Processes, children, per_us
from .rounds import run_rounds, warm_up

# `up` with a token: not a command-line option (over TCP, `serve` and a separately run Envoy are
# the supported form); the runner's option for tests and measurements
TCP_UP = ("import asyncio, sys; from extproc.ops.up import UpOptions, run_up; "
          "from extproc.cli.main import build_parser; from extproc.cli.flags import upstream_options; "
          "a = build_parser().parse_args(['up', *sys.argv[1:]]); "
          "sys.exit(asyncio.run(run_up(UpOptions(config=a.config, listen=a.listen, admin=a.admin, "
          "upstream=upstream_options(a), metrics=None, access_log=None, concurrency=a.concurrency, "
          "tcp_token='t' * 43))))")
VARIANTS = ["before", "uds", "tcp-token"]


def start(stage: Stage, variant: str, config, before_src) -> Contender:
    """A variant's gateway, answering; its accounts: "control" (the `up` process) and "envoy"."""
    gateway = start_gateway(stage, variant, config, options=["--concurrency", "1"],
                            source=before_src if variant == "before" else None,
                            command=(sys.executable, "-c", TCP_UP) if variant == "tcp-token" else
                            (sys.executable, "-m", "extproc", "up"))
    stage.wait_serving(gateway)
    (envoy,) = children(gateway.process.pid)
    gateway.processes = {"control": gateway.processes["ext_proc"], "envoy": Processes.of(envoy, descendants=False)}
    return gateway


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=int, default=6)
    parser.add_argument("--connections", type=int, default=1,
                        help="wrk connections (default 1: no batching of messages, so CPU per request depends "
                             "least on how busy the machine is)")
    parser.add_argument("--before", default=subprocess.run(["git", "merge-base", "HEAD", "main"], cwd=ROOT,
                                                           capture_output=True, text=True).stdout.strip() or "HEAD")
    args = parser.parse_args(argv)
    with Stage("llm-gateway-bench-auth-") as stage:
        before_src = stage.work / "before"
        before_src.mkdir()
        archive = subprocess.run(["git", "archive", args.before, "extproc"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(before_src)], input=archive, check=True)
        config = stage.config_dir("config")
        running = {v: start(stage, v, config, before_src) for v in VARIANTS}
        write_script(stage, list(running.values()))
        warm_up(running.values(), 2)

        def run(c: Contender, connections: int) -> dict:
            out = run_wrk(c.port, c.script, connections, args.seconds)
            assert out["errors"] == 0, (c.name, out)
            return out

        def line(r: int, c: Contender, _connections: int, done: list[dict]) -> str:
            out = done[-1]
            return (f"round {r} {c.name:9s}: {out['requests']:6d} requests, control plane "
                    f"{per_us(out['cpu_s']['control'], out['requests']):6.1f} µs/request, Envoy "
                    f"{per_us(out['cpu_s']['envoy'], out['requests']):6.1f} µs/request, "
                    f"{out['rps']:6.0f} req/s (noise)")

        runs = {v: by_c[args.connections]
                for v, by_c in run_rounds(running, args.rounds, run, (args.connections,), line=line).items()}
    results = {v: {"control_us": [per_us(r["cpu_s"]["control"], r["requests"]) for r in done],
                   "envoy_us": [per_us(r["cpu_s"]["envoy"], r["requests"]) for r in done],
                   "rps": [r["rps"] for r in done]} for v, done in runs.items()}
    # the median, and the minimum (interference from other processes only ever adds CPU time)
    summary = {v: {**{k: round(statistics.median(x), 1) for k, x in m.items()},
                   **{f"{k}_min": round(min(x), 1) for k, x in m.items() if k != "rps"}} for v, m in results.items()}
    for v in VARIANTS:
        s, base = summary[v], summary["before"]
        for suffix in ("", "_min"):
            s[f"total_us{suffix}"] = round(s[f"control_us{suffix}"] + s[f"envoy_us{suffix}"], 1)
            s[f"total_vs_before{suffix}"] = round(s[f"total_us{suffix}"] / (base[f"control_us{suffix}"] +
                                                                             base[f"envoy_us{suffix}"]), 3)
    summary["per_stream_check"] = {k: round(x, 3) for k, x in check_costs().items()}
    print(json.dumps(summary, indent=2))
    return 0
