"""The streaming benchmark (the second half of scripts/bench): C concurrent streams of E events
P ms apart through each contender (bare, floor, gateway, gateway_cmp).

- `paced_provider`: a fake provider over TLS (HTTP/1.1, keep-alive; `extproc.testing.stream_provider`)
  that answers every request with E server-sent events P ms apart, each stamped with the
  CLOCK_MONOTONIC time it was written (`"sent_ns"`), then a usage event and `[DONE]`. It runs in
  its own process (`python -m benchmarks paced-provider CERT KEY PORT`).
- `run_streams`: C concurrent streamed requests to a contender; per event, the gap between the
  provider writing it and the client reading it.
- `streaming_benchmark`: CPU per event of each contender's processes, streams/s, each event's
  delay, the client's time to its first event; `memory_per_stream`: RSS per open stream.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import time

from extproc.testing import stream_provider

from .contenders import Contender
from .measure import median, percentile
from .rounds import cpu_us_per, run_rounds

# --- the paced provider ---------------------------------------------------------------------


def paced_provider(cert: str, key: str, port: int) -> None:
    """Run the paced provider until killed (its own process: its CPU is nobody's contender's):
    `extproc.testing.stream_provider`, over HTTP/1.1 only, as this benchmark has always measured."""
    stream_provider.run(cert, key, port, http1_only=True)


def main(argv: list[str]) -> int:
    """`python -m benchmarks paced-provider CERT KEY PORT`: started by the bench."""
    cert, key, port = argv
    paced_provider(cert, key, int(port))
    return 0


# --- the streaming client -------------------------------------------------------------------

_SENT = re.compile(rb'"sent_ns":(\d+),')


async def _one_stream(port: int, host: str, body: bytes, events: int, pace_ms: int,
                      delays: list[int], opened: asyncio.Event | None, hold: asyncio.Event | None,
                      firsts: list[int] | None = None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent_at = time.monotonic_ns()
    writer.write(f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                 f"connection: close\r\nx-events: {events}\r\nx-pace-ms: {pace_ms}\r\n"
                 f"content-length: {len(body)}\r\n\r\n".encode() + body)
    carry = b""
    seen = 0
    while True:
        data = await reader.read(65536)
        now = time.monotonic_ns()
        if not data:
            break
        carry += data
        last = 0
        for match in _SENT.finditer(carry):
            delays.append(now - int(match.group(1)))
            seen += 1
            last = match.end()
            if seen == 1 and opened is not None:
                opened.set()
            if seen == 1 and firsts is not None:
                firsts.append(now - sent_at)
        carry = carry[last:] if last else carry[-64:]
        if hold is not None and seen and not hold.is_set():
            await hold.wait()
    writer.close()
    return seen


def run_streams(port: int, host: str, streams: int, events: int, pace_ms: int) -> dict:
    """C streams at once, E events each P ms apart: the events received and each one's delay."""
    body = json.dumps({"model": "paced-model", "messages": [{"role": "user", "content": "Hi"}],
                       "stream": True}).encode()
    delays: list[int] = []
    firsts: list[int] = []

    async def main() -> list[int]:
        return await asyncio.gather(*(_one_stream(port, host, body, events, pace_ms, delays, None, None, firsts)
                                      for _ in range(streams)))

    started = time.monotonic()
    got = asyncio.run(main())
    wall = time.monotonic() - started
    return {"streams": streams, "events": sum(got), "expected": streams * events, "wall_s": wall,
            "delays_ns": delays, "first_event_ns": firsts}


def hold_streams_open(port: int, host: str, streams: int, measure):
    """Open C streams (1 event a second, long enough to stay open), call `measure()` once every
    one of them has its first event, then let them end. Returns what `measure` returned."""
    body = json.dumps({"model": "paced-model", "messages": [{"role": "user", "content": "Hi"}],
                       "stream": True}).encode()

    async def main():
        opened = [asyncio.Event() for _ in range(streams)]
        hold = asyncio.Event()
        delays: list[int] = []
        tasks = [asyncio.create_task(_one_stream(port, host, body, 3, 1000, delays, o, hold)) for o in opened]
        await asyncio.wait_for(asyncio.gather(*(o.wait() for o in opened)), 120)
        value = measure()
        hold.set()
        await asyncio.gather(*tasks)
        return value

    return asyncio.run(main())


def delay_summary(delays_ns: list[int]) -> dict:
    ms = [d / 1e6 for d in delays_ns]
    return {"p50_ms": median(ms), "p99_ms": percentile(ms, 0.99)}


# --- the benchmark ----------------------------------------------------------------------------


def streaming_benchmark(contenders: dict[str, Contender], host: str, rounds: int, repeats: int,
                        streams: int, events: int, pace_ms: int) -> dict:
    """Each contender in turn, rotated per round: CPU per event of all its processes, streams/s,
    each event's delay, the client's time to its first event."""
    for c in contenders.values():  # warm up: connections to the provider, caches
        run_streams(c.port, host, 8, 5, 5)

    def line(r: int, c: Contender, _pass, so_far: list[dict]) -> str:
        delays = [d for run in so_far for d in run["delays_ns"]]
        return (f"streams round {r} {c.name:12s}: {cpu_us_per(so_far, 'all', 'events'):7.1f} us CPU per event so far, "
                f"p50 delay {delay_summary(delays)['p50_ms']:.2f} ms")

    runs = run_rounds(contenders, rounds, lambda c, _pass: run_streams(c.port, host, streams, events, pace_ms),
                      repeats=repeats, line=line)
    out: dict = {"streams": streams, "events": events, "pace_ms": pace_ms, "rounds": rounds, "repeats": repeats,
                 "contenders": {}}
    for n, by_pass in runs.items():
        (done,) = by_pass.values()
        wall = sum(run["wall_s"] for run in done)
        firsts = [f for run in done for f in run["first_event_ns"]]
        out["contenders"][n] = {
            "cpu_us_per_event": cpu_us_per(done, "all", "events"),
            "streams_per_s": rounds * repeats * streams / wall if wall else 0.0,
            "events_missing": sum(run["expected"] - run["events"] for run in done),
            "client_first_event_ms_mean": statistics.fmean(firsts) / 1e6 if firsts else None,
            **{f"delay_{k}": v for k, v in delay_summary([d for run in done for d in run["delays_ns"]]).items()},
        }
    bare = out["contenders"].get("bare")
    for c in out["contenders"].values():
        if bare:
            c["cpu_over_bare"] = c["cpu_us_per_event"] / bare["cpu_us_per_event"]
            c["added_delay_p50_ms"] = c["delay_p50_ms"] - bare["delay_p50_ms"]
            c["added_delay_p99_ms"] = c["delay_p99_ms"] - bare["delay_p99_ms"]
    return out


def memory_per_stream(contenders: dict[str, Contender], host: str, counts: tuple[int, ...]) -> dict:
    """RSS growth of each contender's processes per open stream, with `count` streams open."""
    out: dict = {}
    for count in counts:
        for n, c in contenders.items():
            processes = c.processes["all"]
            idle = processes.rss_kib()
            busy = hold_streams_open(c.port, host, count, processes.rss_kib)
            out.setdefault(n, {})[f"rss_kib_per_stream_{count}"] = (busy - idle) / count
            print(f"RSS with {count} open streams, {n:12s}: {(busy - idle) / count:.1f} KiB per stream", flush=True)
    return out
