"""What Envoy's answer reader (`extproc.envoy.answer_reader`: a sampled answer's finish reason, read
by a Lua filter as the answer passes) costs per streamed event:
`python -m benchmarks answer-reader [--rounds N --streams C --events E]`.

Three `extproc up` on the paced provider (benchmarks/streams.py), C concurrent streams of E
events each, rounds rotated: `off` (no exporter: the reader is off, as in every gateway without
traces), `unsampled` (an exporter, `OTEL_TRACES_SAMPLER=always_off`: the reader runs for every
answer and stops at its one metadata lookup), `sampled` (`always_on`: every event goes through
the Lua pattern match). Envoy's CPU per event (the gateway process's children) is what the reader
adds to; the ext_proc's is printed beside (the sampled variant builds spans: per request, not per
event). The exporter points at a port where nothing listens: spans are dropped, counted.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from extproc.testing.ports import free_port

from .contenders import HOST, PACED_HOST, PACED_PROVIDER_YAML, Stage, start_gateway, start_paced_provider
from .rounds import cpu_us_per, run_rounds
from .streams import run_streams


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks answer-reader", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams per run")
    parser.add_argument("--events", type=int, default=200, help="events per stream")
    parser.add_argument("--pace-ms", type=int, default=1, help="between a stream's events")
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv or [])
    args.out.mkdir(exist_ok=True)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: spans are built, then dropped
    variants = {"off": ([], {}),
                "unsampled": (["--otlp-endpoint", dead], {"OTEL_TRACES_SAMPLER": "always_off"}),
                "sampled": (["--otlp-endpoint", dead], {"OTEL_TRACES_SAMPLER": "always_on",
                                                         "OTEL_EXPORTER_OTLP_TIMEOUT": "1"})}
    with Stage("llm-gateway-answer-reader-") as stage:
        paced = start_paced_provider(stage)
        config = stage.config_dir("config", ("02-paced.yaml", PACED_PROVIDER_YAML))
        contenders = {name: start_gateway(stage, name, config, resolve={HOST: stage.fake_port, PACED_HOST: paced},
                                          metrics=True,
                                          options=options, env=env)
                      for name, (options, env) in variants.items()}
        for c in contenders.values():
            stage.wait_serving(c)
            run_streams(c.port, PACED_HOST, 8, 5, 5)  # warm up

        def line(r: int, c, _pass, so_far: list[dict]) -> str:
            envoy = cpu_us_per(so_far, "all", "events") - cpu_us_per(so_far, "ext_proc", "events")
            return f"round {r} {c.name:10s}: Envoy {envoy:6.2f} us CPU per event so far"

        runs = run_rounds(contenders, args.rounds,
                          lambda c, _pass: run_streams(c.port, PACED_HOST, args.streams, args.events, args.pace_ms),
                          repeats=args.repeats, line=line)
    out: dict = {"streams": args.streams, "events": args.events, "pace_ms": args.pace_ms, "rounds": args.rounds,
                 "repeats": args.repeats, "variants": {}}
    for name, by_pass in runs.items():
        (done,) = by_pass.values()
        rounds = [done[i:i + args.repeats] for i in range(0, len(done), args.repeats)]
        out["variants"][name] = {
            "envoy_cpu_us_per_event": cpu_us_per(done, "all", "events") - cpu_us_per(done, "ext_proc", "events"),
            "envoy_cpu_us_per_event_by_round": [cpu_us_per(r, "all", "events") - cpu_us_per(r, "ext_proc", "events")
                                                for r in rounds],
            "ext_proc_cpu_us_per_event": cpu_us_per(done, "ext_proc", "events"),
            "events_missing": sum(run["expected"] - run["events"] for run in done),
        }
    off = out["variants"]["off"]["envoy_cpu_us_per_event"]
    for name, v in out["variants"].items():
        v["envoy_added_us_per_event"] = v["envoy_cpu_us_per_event"] - off
        print(f"{name:10s}: Envoy {v['envoy_cpu_us_per_event']:.2f} us per event ({v['envoy_added_us_per_event']:+.2f} "
              f"over off; rounds {', '.join(f'{x:.2f}' for x in v['envoy_cpu_us_per_event_by_round'])}), ext_proc "
              f"{v['ext_proc_cpu_us_per_event']:.2f} us, events missing {v['events_missing']}", flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = args.out / f"answer-reader-{stamp}.json"
    path.write_text(json.dumps(out, indent=2))
    print(f"written: {path}")
    return 0 if all(v["events_missing"] == 0 for v in out["variants"].values()) else 1
