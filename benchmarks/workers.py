"""The benchmark behind scripts/bench-workers: `extproc serve --workers 1` against `--workers 2`,
each behind its own Envoy, and bare Envoy, in one run; throughput as ratios to bare Envoy and CPU
per request of the ext_proc processes (all of them, from /proc)."""

from __future__ import annotations

import argparse
import os

from .contenders import Contender, Stage, start_bare, start_served, write_script
from .rounds import cpu_us_per, run_rounds, under_wrk, warm_up


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/bench-workers", description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    with Stage("llm-gateway-bench-workers-", wait_s=30) as stage:
        config = stage.config_dir("config")
        contenders: dict[str, Contender] = {"bare": start_bare(stage)}
        for workers in (1, 2):
            served = start_served(stage, workers, config)
            contenders[served.name] = served
        write_script(stage, list(contenders.values()))
        for c in contenders.values():
            stage.wait_serving(c)
        warm_up(contenders.values())

        def line(r: int, c: Contender, _connections: int, done: list[dict]) -> str:
            result = done[-1]
            return (f"round {r} {c.name:10s}: {result['rps']:8.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                    f"errors {result['errors']}")

        runs = run_rounds(contenders, args.rounds, under_wrk(args.seconds), (args.connections,), line=line)
        rps = {n: [r["rps"] for r in by_c[args.connections]] for n, by_c in runs.items()}
        bare = sum(rps["bare"]) / len(rps["bare"])
        print(f"\n{os.cpu_count()} cores, c={args.connections}, {args.rounds} rounds of {args.seconds}s")
        for name in contenders:
            if name == "bare":
                continue
            mean = sum(rps[name]) / len(rps[name])
            print(f"{name:10s}: {mean:8.0f} req/s = {mean / bare:.2f} x bare Envoy ({bare:.0f} req/s); "
                  f"ext_proc CPU {cpu_us_per(runs[name][args.connections], 'ext_proc'):.0f} us per request "
                  "(all processes)")
        return 0
