"""Thousands of streams at once (`scripts/bench --concurrent-streams`, issue 31): what one gateway
holds and what each stream costs it.

For each count C (default 1,000, 5,000 and 10,000), a fresh `extproc up` in front of the stream
provider (`extproc.testing.stream_provider`: TLS, HTTP/2 as real providers offer it, as strict as
the real API), and C clients (`extproc.testing.stream_clients`) arriving over a ramp, each
streaming E events over S seconds (default 20 events over 60 s) and reading its whole answer.
While every stream is open, it reads:
  - Envoy's and the ext_proc's memory per open stream (RSS growth over the idle gateway's, / C),
    and Envoy's peak (VmHWM) per stream;
  - the file descriptors Envoy holds;
  - the ext_proc streams open (each ends when its request is decided, so none should be);
then, once all have ended: CPU per event of Envoy and of the ext_proc, streams that failed.
Written to bench-results/ as JSON and a PNG. The goal (issue 31): 10,000 streams of 60 s, none
failed, the ext_proc's memory flat, Envoy's at most 50 KiB per stream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from extproc.ops.descriptors import raise_descriptor_limit
from extproc.testing.ports import free_port
from extproc.testing.stream_clients import CHAT_STREAM, StreamResult, stream_request
from extproc.testing.stream_provider import call

from .contenders import KEY, PACED_HOST, PACED_PROVIDER_YAML, ROOT, Stage, start_gateway
from .measure import children, cpu_seconds, rss_kib, wait_http

GOAL_ENVOY_KIB_PER_STREAM = 50
DEFAULT_COUNTS = (1000, 5000, 10000)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="scripts/bench --concurrent-streams", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrent-streams", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stream-counts", type=int, nargs="+", default=list(DEFAULT_COUNTS), metavar="C",
                        help="concurrent streams per run (default 1000 5000 10000)")
    parser.add_argument("--stream-seconds", type=float, default=60, metavar="S", help="each stream's length (60)")
    parser.add_argument("--stream-events", type=int, default=20, metavar="E", help="events per stream (20)")
    parser.add_argument("--ramp-seconds", type=float, default=10, metavar="R",
                        help="the clients arrive spread over R seconds, as traffic does (10; 0: all at once)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results")
    return parser.parse_args(argv)


def descriptors(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def open_ext_proc_streams(metrics_port: int) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("llm_gateway_ext_proc_streams "))


def one_count(stage: Stage, provider_port: int, count: int, events: int, seconds: float, ramp: float) -> dict:
    """C streams through a fresh gateway: its figures."""
    config = stage.work / f"config-{count}"
    config.mkdir()
    (config / "paced.yaml").write_text(PACED_PROVIDER_YAML)
    gateway = start_gateway(stage, f"c{count}", config, resolve={PACED_HOST: provider_port}, metrics=True)
    wait_http(f"http://127.0.0.1:{gateway.metrics_port}/metrics", 60, gateway.process)
    pace_ms = int(1000 * seconds / max(events - 1, 1))
    headers = [("x-events", str(events)), ("x-pace-ms", str(pace_ms))]
    ext_proc = gateway.process.pid

    async def run() -> dict:
        # warm: connections to the provider and the ext_proc, the access-log stream
        for _ in range(60):
            warm = await stream_request(gateway.port, PACED_HOST, CHAT_STREAM, [("x-events", "2"), ("x-pace-ms", "1")])
            if warm.complete:
                break
            await asyncio.sleep(0.5)
        else:
            raise RuntimeError(f"the gateway does not stream: {warm}{stage.logs()}")
        envoy = children(ext_proc)[0]
        await asyncio.sleep(1)
        idle = {"envoy": rss_kib(envoy), "ext_proc": rss_kib(ext_proc)}
        cpu = {"envoy": cpu_seconds(envoy), "ext_proc": cpu_seconds(ext_proc)}
        firsts = [asyncio.Event() for _ in range(count)]

        async def client(i: int) -> StreamResult:
            await asyncio.sleep(ramp * i / count)
            return await stream_request(gateway.port, PACED_HOST, CHAT_STREAM, headers, first_event=firsts[i],
                                        timeout_s=seconds * 3 + ramp + 120)

        started = time.monotonic()
        streams = asyncio.ensure_future(asyncio.gather(*(client(i) for i in range(count))))
        opened = asyncio.ensure_future(asyncio.gather(*(f.wait() for f in firsts)))
        await asyncio.wait({streams, opened}, return_when=asyncio.FIRST_COMPLETED)
        all_open = opened.done()
        opened.cancel()
        held = {"envoy": rss_kib(envoy), "ext_proc": rss_kib(ext_proc), "envoy_descriptors": descriptors(envoy),
                "ext_proc_streams_open": await asyncio.to_thread(open_ext_proc_streams, gateway.metrics_port),
                "all_open_after_s": time.monotonic() - started}
        results = await streams
        spent = {k: cpu_seconds(pid) - cpu[k] for k, pid in (("envoy", envoy), ("ext_proc", ext_proc))}
        failed = [r for r in results if not (r.complete and r.events == events)]
        return {
            "streams": count, "events_per_stream": events, "stream_seconds": seconds, "ramp_seconds": ramp,
            "all_open_at_once": all_open, "all_open_after_s": held["all_open_after_s"],
            "failed": len(failed), "failures": sorted({f.error[:80] or str(f.status) for f in failed})[:5],
            "envoy_kib_per_stream": (held["envoy"] - idle["envoy"]) / count,
            "envoy_peak_kib_per_stream": (peak_kib(envoy) - idle["envoy"]) / count,
            "ext_proc_kib_per_stream": (held["ext_proc"] - idle["ext_proc"]) / count,
            "envoy_mib": {"idle": idle["envoy"] / 1024, "open": held["envoy"] / 1024},
            "ext_proc_mib": {"idle": idle["ext_proc"] / 1024, "open": held["ext_proc"] / 1024},
            "envoy_descriptors": held["envoy_descriptors"],
            "ext_proc_streams_open": held["ext_proc_streams_open"],
            "envoy_cpu_us_per_event": 1e6 * spent["envoy"] / (count * events),
            "ext_proc_cpu_us_per_event": 1e6 * spent["ext_proc"] / (count * events),
            "wall_s": time.monotonic() - started,
        }

    try:
        return asyncio.run(run())
    finally:
        gateway.process.terminate()
        gateway.process.wait(30)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(exist_ok=True)
    raise_descriptor_limit(max(args.stream_counts))  # this process holds a connection per client
    runs = []
    with Stage("llm-gateway-concurrency-", wait_s=30) as stage:
        port = free_port()
        cert = stage.ca.issue([PACED_HOST], stem="stream-provider")
        stage.start([sys.executable, "-m", "extproc.testing.stream_provider", "--cert", cert.cert_file, "--key",
                     cert.key_file, "--port", port, "--api-key-env", "YOUR_DASHSCOPE_API_KEY"], "provider.log",
                    env={**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY}, cwd=ROOT)
        deadline = time.monotonic() + 30
        while True:
            try:
                call(port, "/stats", str(stage.ca.cert_file), PACED_HOST, "GET")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the stream provider did not start{stage.logs()}") from None
                time.sleep(0.2)
        for count in args.stream_counts:
            run = one_count(stage, port, count, args.stream_events, args.stream_seconds, args.ramp_seconds)
            runs.append(run)
            print(line(run), flush=True)
    summary = {"machine": {"cores": os.cpu_count()}, "goal_envoy_kib_per_stream": GOAL_ENVOY_KIB_PER_STREAM,
               "runs": runs}
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (args.out / f"concurrency-{stamp}.json").write_text(json.dumps(summary, indent=2))
    chart(summary, args.out / f"concurrency-{stamp}.png")
    print(f"\nwritten: {args.out / f'concurrency-{stamp}.json'}, {args.out / f'concurrency-{stamp}.png'}")
    return 0 if all(r["failed"] == 0 for r in runs) else 1


def line(r: dict) -> str:
    return (f"{r['streams']:6d} streams x {r['stream_seconds']:g} s: {r['failed']} failed; memory per open stream: "
            f"Envoy {r['envoy_kib_per_stream']:.1f} KiB (peak {r['envoy_peak_kib_per_stream']:.1f}), ext_proc "
            f"{r['ext_proc_kib_per_stream']:.2f} KiB ({r['ext_proc_mib']['idle']:.0f} -> "
            f"{r['ext_proc_mib']['open']:.0f} MiB); CPU per event: Envoy {r['envoy_cpu_us_per_event']:.1f} us, "
            f"ext_proc {r['ext_proc_cpu_us_per_event']:.2f} us; Envoy descriptors {r['envoy_descriptors']}; "
            f"ext_proc streams open {r['ext_proc_streams_open']:g}")


def chart(summary: dict, path: Path) -> None:
    """Memory per open stream and CPU per event, by number of concurrent streams."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = summary["runs"]
    counts = [str(r["streams"]) for r in runs]
    fig, (mem, cpu) = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.27
    xs = range(len(runs))
    for offset, key, label, color, fmt in ((-width, "envoy_kib_per_stream", "Envoy, all open", "#2a7ab0", "%.1f"),
                                           (0, "envoy_peak_kib_per_stream", "Envoy, peak", "#4bacc6", "%.1f"),
                                           (width, "ext_proc_kib_per_stream", "ext_proc", "#9bbb59", "%.2f")):
        bars = mem.bar([x + offset for x in xs], [r[key] for r in runs], width, label=label, color=color)
        mem.bar_label(bars, fmt=fmt)
    mem.axhline(summary["goal_envoy_kib_per_stream"], color="#c0504d", linestyle="--", label="goal: Envoy 50 KiB")
    mem.set_xticks(list(xs), counts)
    mem.set_xlabel("concurrent streams")
    mem.set_title("memory per open stream (KiB)")
    top = max(max(r["envoy_peak_kib_per_stream"] for r in runs), summary["goal_envoy_kib_per_stream"])
    mem.set_ylim(top=top * 1.45)  # room for the legend above the bars
    mem.legend(loc="upper center", ncol=2, fontsize=8)
    for offset, key, label, color in ((-width / 2, "envoy_cpu_us_per_event", "Envoy", "#2a7ab0"),
                                      (width / 2, "ext_proc_cpu_us_per_event", "ext_proc", "#9bbb59")):
        bars = cpu.bar([x + offset for x in xs], [r[key] for r in runs], width, label=label, color=color)
        cpu.bar_label(bars, fmt="%.1f")
    cpu.set_xticks(list(xs), counts)
    cpu.set_xlabel("concurrent streams")
    cpu.set_title("CPU per streamed event (µs, all of a run)")
    cpu.legend()
    failed = sum(r["failed"] for r in runs)
    first = runs[0]
    fig.suptitle(f"one gateway, {summary['machine']['cores']} cores: streams of {first['stream_seconds']:g} s, "
                 f"{first['events_per_stream']} events each, arriving over {first['ramp_seconds']:g} s; "
                 f"{failed} failed")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
