"""The streaming half of scripts/bench, and the floor contender: kept apart from bench.py so the
request benchmark and this one change independently.

- `paced_provider`: a fake provider over TLS (HTTP/1.1, keep-alive) that answers every request
  with E server-sent events P ms apart, each stamped with the CLOCK_MONOTONIC time it was written
  (`"sent_ns"`), then a usage event and `[DONE]`. It runs in its own process.
- `run_streams`: C concurrent streamed requests to a contender; per event, the gap between the
  provider writing it and the client reading it.
- `floor_server`: the ext_proc design's floor: the same lean HTTP/2 server as the gateway
  (`extproc.dataplane.grpc_h2`) answering every request with a prebuilt response (no parsing, routing or
  rewrite), and taking the access log without reading it.

Experiment knobs for the floor's bootstrap (attributing a cost; not for the headline figures):
BENCH_FLOOR_DROP=name,... drops filters by name (`accesslog` drops the access logs);
BENCH_FLOOR_GOOGLE_GRPC=1 gives its ext_proc filter Envoy's google_grpc client.
"""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import statistics
import sys
import time

# --- the paced provider ---------------------------------------------------------------------

_EVENT = ('{{"sent_ns":{t},"id":"chatcmpl-paced","object":"chat.completion.chunk","model":"paced-model",'
          '"choices":[{{"index":0,"delta":{{"content":"tok "}},"finish_reason":null}}]}}')


async def _serve_paced(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in
                       (line.partition(b":") for line in head.split(b"\r\n")[1:] if line)}
            await reader.readexactly(int(headers.get(b"content-length", b"0")))
            events = int(headers.get(b"x-events", b"50"))
            pace = int(headers.get(b"x-pace-ms", b"20")) / 1000
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            for i in range(events):
                if i:
                    await asyncio.sleep(pace)
                data = b"data: " + _EVENT.format(t=time.monotonic_ns()).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                await writer.drain()
            tail = (b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","model":"paced-model","choices":[],'
                    b'"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n'
                    % (events, events + 5))
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def paced_provider(cert: str, key: str, port: int) -> None:
    """Run the paced provider until killed (its own process: its CPU is nobody's contender's)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])

    async def main() -> None:
        server = await asyncio.start_server(_serve_paced, "127.0.0.1", port, ssl=context, backlog=1024)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# --- the streaming client -------------------------------------------------------------------

_SENT = re.compile(rb'"sent_ns":(\d+),')


async def _one_stream(port: int, host: str, body: bytes, events: int, pace_ms: int,
                      delays: list[int], opened: asyncio.Event | None, hold: asyncio.Event | None,
                      firsts: list[int] | None = None) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    sent_at = time.monotonic_ns()
    writer.write(f"POST / HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 f"x-events: {events}\r\nx-pace-ms: {pace_ms}\r\ncontent-length: {len(body)}\r\n\r\n".encode() + body)
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
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()
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


def hold_streams_open(port: int, host: str, streams: int, measure) -> float:
    """Open C streams (1 event a second, long enough to stay open), call `measure()` once every
    one of them has its first event, then let them end. Returns what `measure` returned."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()

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


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def delay_summary(delays_ns: list[int]) -> dict:
    ms = [d / 1e6 for d in delays_ns]
    return {"p50_ms": statistics.median(ms) if ms else float("nan"), "p99_ms": percentile(ms, 0.99)}


# --- the floor contender --------------------------------------------------------------------


def floor_server(host: str, port: int, cluster: str, provider_host: str, path: str, key: str) -> None:
    """An ext_proc that answers every request with one prebuilt response: the request's own body,
    the headers routing needs. What remains is the design's cost: Envoy's side of the call, the
    lean server's framing, the event loop."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.grpc_h2 import serve
    from extproc.protocol import CLUSTER_HEADER

    def header(k: str, v: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                          append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)

    headers_answer = pb.ProcessingResponse()
    common = headers_answer.request_headers.response
    # the same header changes as the gateway's but the host: the bench's clients already name the
    # provider host, and the floor's Envoy routes by it (the floor serves two providers, reading nothing)
    common.header_mutation.set_headers.extend([header(":path", path), header(CLUSTER_HEADER, cluster),
                                               header("authorization", f"Bearer {key}")])
    common.clear_route_cache = True
    headers_bytes = headers_answer.SerializeToString()
    body_bytes = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()

    class Prebuilt:
        """Headers, then the body in chunks (Envoy may send an empty last one): every message is
        answered at once when the body is whole, as the gateway's ext_proc does."""
        __slots__ = ("chunks",)

        def __init__(self) -> None:
            self.chunks = 0

        def on_message(self, message: bytes):
            request = pb.ProcessingRequest.FromString(message)
            if request.HasField("request_headers"):
                return None, False
            self.chunks += 1
            if request.request_body.end_of_stream:
                return [headers_bytes, *([body_bytes] * self.chunks)], True
            return None, False

    class Drop:
        def on_message(self, message: bytes):
            return None, False

        def on_client_end(self) -> bytes:
            return b""

    from extproc.dataplane.health_check import HealthCheck
    from extproc.protocol import HEALTH_CHECK

    methods = {"/envoy.service.ext_proc.v3.ExternalProcessor/Process": lambda identity: Prebuilt(),
               "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs": lambda identity: Drop(),
               HEALTH_CHECK: lambda identity: HealthCheck(lambda: True)}  # Envoy health-checks a TCP ext_proc

    async def main() -> None:
        server = await serve(host, port, methods, 16 << 20)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "provider":
        paced_provider(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    elif role == "floor":
        floor_server("127.0.0.1", int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6])
    else:
        raise SystemExit(f"unknown role {role}")


# --- the contenders' processes ----------------------------------------------------------------

def process_tree(pid: int) -> list[int]:
    """A process and its descendants (the gateway's Envoy is a child of `extproc up`)."""
    from pathlib import Path

    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                todo += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
    return out


def tree_cpu_seconds(pids: list[int]) -> float:
    import os
    from pathlib import Path

    total = 0.0
    for root in pids:
        for p in process_tree(root):
            try:
                fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def tree_rss_kib(pids: list[int]) -> int:
    from pathlib import Path

    total = 0
    for root in pids:
        for p in process_tree(root):
            try:
                for line in Path(f"/proc/{p}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
            except OSError:
                pass
    return total


def streaming_benchmark(contenders: dict[str, tuple[int, list[int]]], host: str, rounds: int, repeats: int,
                        streams: int, events: int, pace_ms: int) -> dict:
    """Each contender (name -> (port, pids)) in turn, rotated per round: CPU per event of all its
    processes, streams/s, each event's delay, the client's time to its first event."""
    names = list(contenders)
    cpu = {n: 0.0 for n in names}
    delivered = {n: 0 for n in names}
    wall = {n: 0.0 for n in names}
    delays: dict[str, list[int]] = {n: [] for n in names}
    missing = {n: 0 for n in names}
    firsts: dict[str, list[int]] = {n: [] for n in names}
    for n in names:  # warm up: connections to the provider, caches
        run_streams(contenders[n][0], host, 8, 5, 5)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for n in order:
            port, pids = contenders[n]
            for _ in range(repeats):
                before = tree_cpu_seconds(pids)
                result = run_streams(port, host, streams, events, pace_ms)
                cpu[n] += tree_cpu_seconds(pids) - before
                delivered[n] += result["events"]
                missing[n] += result["expected"] - result["events"]
                wall[n] += result["wall_s"]
                delays[n] += result["delays_ns"]
                firsts[n] += result["first_event_ns"]
            print(f"streams round {r + 1} {n:12s}: {1e6 * cpu[n] / max(delivered[n], 1):7.1f} us CPU per event so far, "
                  f"p50 delay {delay_summary(delays[n])['p50_ms']:.2f} ms", flush=True)
    out: dict = {"streams": streams, "events": events, "pace_ms": pace_ms, "rounds": rounds, "repeats": repeats,
                 "contenders": {}}
    for n in names:
        out["contenders"][n] = {
            "cpu_us_per_event": 1e6 * cpu[n] / max(delivered[n], 1),
            "streams_per_s": rounds * repeats * streams / wall[n] if wall[n] else 0.0,
            "events_missing": missing[n],
            "client_first_event_ms_mean": statistics.fmean(firsts[n]) / 1e6 if firsts[n] else None,
            **{f"delay_{k}": v for k, v in delay_summary(delays[n]).items()},
        }
    bare = out["contenders"].get("bare")
    for n, c in out["contenders"].items():
        if bare:
            c["cpu_over_bare"] = c["cpu_us_per_event"] / bare["cpu_us_per_event"]
            c["added_delay_p50_ms"] = c["delay_p50_ms"] - bare["delay_p50_ms"]
            c["added_delay_p99_ms"] = c["delay_p99_ms"] - bare["delay_p99_ms"]
    return out


def memory_per_stream(contenders: dict[str, tuple[int, list[int]]], host: str, counts: tuple[int, ...]) -> dict:
    """RSS growth of each contender's processes per open stream, with `count` streams open."""
    out: dict = {}
    for count in counts:
        for n in contenders:
            port, pids = contenders[n]
            idle = tree_rss_kib(pids)
            busy = hold_streams_open(port, host, count, lambda: tree_rss_kib(pids))
            out.setdefault(n, {})[f"rss_kib_per_stream_{count}"] = (busy - idle) / count
            print(f"RSS with {count} open streams, {n:12s}: {(busy - idle) / count:.1f} KiB per stream", flush=True)
    return out


def floor_bootstrap(listen: int, admin: int, floor_port: int, provider_clusters: dict[str, dict],
                    access_log: str) -> dict:
    """The gateway's own bootstrap (the same filters, access logs and limits), its ext_proc being
    the floor server, the provider clusters static and chosen by host (the floor reads nothing)."""
    from extproc.envoy.addresses import HostPort
    from extproc.envoy.bootstrap import bootstrap, BootstrapOptions
    from extproc.protocol import CONTROL_CLUSTER

    boot = bootstrap(BootstrapOptions(listen=HostPort("127.0.0.1", listen), admin=HostPort("127.0.0.1", admin),
                                      ext_proc=HostPort("127.0.0.1", floor_port), access_log=access_log))
    del boot["dynamic_resources"]
    statics = boot["static_resources"]
    statics["clusters"] = [c for c in statics["clusters"] if c["name"] != CONTROL_CLUSTER] + list(provider_clusters.values())
    hcm = statics["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    import os
    drop = os.environ.get("BENCH_FLOOR_DROP", "").split(",")
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in drop]
    if "accesslog" in drop:
        hcm["access_log"] = []
    if os.environ.get("BENCH_FLOOR_GOOGLE_GRPC"):  # Envoy's google_grpc client instead of envoy_grpc
        for f in hcm["http_filters"]:
            service = f["typed_config"].get("grpc_service")
            if service and "envoy_grpc" in service:
                limit = service["envoy_grpc"].get("max_receive_message_length")
                f["typed_config"]["grpc_service"] = {"google_grpc": {
                    "target_uri": f"127.0.0.1:{floor_port}", "stat_prefix": "floor",
                    **({"per_stream_buffer_limit_bytes": limit} if limit else {})}}
    hcm.pop("rds", None)  # static routes: the floor has no xDS
    hcm["route_config"] = {"name": "floor", "virtual_hosts": [
        {"name": name, "domains": [host], "include_request_attempt_count": True,  # the retry rewrite skips attempt 1
         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "300s"}}]}
        for host, name in ((h, c["name"]) for h, c in provider_clusters.items())]}
    return boot
