"""The load of each model server, scraped from its Prometheus metrics on a short interval, for
the endpoint picker (docs/in-cluster-models.md).

Each endpoint of every pool in the routing table is asked `GET /metrics` every `interval_s`
(0.2 s), at most one scrape per endpoint at a time. A scrape is bounded in time (`timeout_s`)
and size (`limit` bytes): an endpoint that is slow, answers too much or answers garbage keeps
its last good load, which turns stale after `PickerSettings.stale_s` (then the picker counts
outstanding requests instead); nothing it does stalls picking, which only reads the last
loads. Runs only while the table has pools: a config without them pays nothing.

The metric names are vLLM's; other servers' equivalents are read too (`NAMES`): a server whose
names are not there is picked by outstanding requests, as with stale metrics.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
import time
from collections.abc import Callable, Mapping

from ..policy.endpoint_picker import Load
from ..policy.endpoint_state import EndpointState
from ..policy.table import Pool

log = logging.getLogger(__name__)

INTERVAL_S = 0.2
TIMEOUT_S = 0.5
LIMIT = 1 << 20  # bytes of one scrape: vLLM's /metrics is some 100 KiB with its histograms

# What the picker reads, and each server's name for it (the first found wins): vLLM, SGLang, TGI.
NAMES = {
    "waiting": (b"vllm:num_requests_waiting", b"sglang:num_queue_reqs", b"tgi_queue_size"),
    "running": (b"vllm:num_requests_running", b"sglang:num_running_reqs", b"tgi_batch_current_size"),
    # vLLM renamed its KV-cache gauge (gpu_ -> kv_); both are read, the new one first
    "kv": (b"vllm:kv_cache_usage_perc", b"vllm:gpu_cache_usage_perc", b"sglang:token_usage"),
}
LORA_INFO = b"vllm:lora_requests_info"
_LABEL = re.compile(rb'(\w+)="((?:[^"\\]|\\.)*)"')


def _samples(text: bytes, name: bytes) -> list[tuple[bytes, float]]:
    """The samples of one metric: (its labels' text, its value), from lines that start with the
    name exactly (a `_bucket` or other suffix is another metric)."""
    found: list[tuple[bytes, float]] = []
    start = 0
    while True:
        at = text.find(name, start)
        if at == -1:
            return found
        end = text.find(b"\n", at)
        end = len(text) if end == -1 else end
        start = end
        if at and text[at - 1:at] != b"\n":
            continue  # inside another line (a # HELP line, a label value)
        rest = text[at + len(name):end]
        labels = b""
        if rest.startswith(b"{"):
            close = rest.rfind(b"}")
            if close == -1:
                continue
            labels, rest = rest[1:close], rest[close + 1:]
        elif not rest.startswith(b" "):
            continue
        fields = rest.split()
        try:
            found.append((labels, float(fields[0])))
        except (ValueError, IndexError):
            continue


def parse_load(text: bytes, at: float, sent_before: int = 0) -> Load | None:
    """A model server's load from its metrics text; None when it holds none of the names (or is
    not metrics at all). Several series of a name (one per model) are added up."""
    values: dict[str, float] = {}
    for what, metric_names in NAMES.items():
        for name in metric_names:
            samples = _samples(text, name)
            if samples:
                values[what] = sum(v for _, v in samples)
                break
    if "waiting" not in values and "running" not in values:
        return None
    adapters: frozenset[str] = frozenset()
    max_adapters = 0
    info = _samples(text, LORA_INFO)
    if info:  # one series per state; its value is when it was set: the latest is the one in force
        labels_text, _ = max(info, key=lambda s: s[1])
        labels = {m.group(1).decode(): m.group(2).decode() for m in _LABEL.finditer(labels_text)}
        listed = ",".join((labels.get("running_lora_adapters", ""), labels.get("waiting_lora_adapters", "")))
        adapters = frozenset(n.strip() for n in listed.split(",") if n.strip())
        max_adapters = int(labels["max_lora"]) if labels.get("max_lora", "").isdigit() else 0
    kv = values.get("kv", 0.0)
    return Load(values.get("waiting", 0.0), values.get("running", 0.0), kv / 100 if kv > 1 else kv, adapters,
                max_adapters, at, sent_before)


async def fetch_metrics(endpoint: str, tls_host: str | None = None, timeout_s: float = TIMEOUT_S,
                        limit: int = LIMIT) -> bytes:
    """`GET /metrics` of one endpoint ("ip:port"), its body; raises on a refusal, a status
    other than 200, more than `limit` bytes or more than `timeout_s` in all."""
    host, _, port = endpoint.rpartition(":")
    host = host.strip("[]")
    context = None
    if tls_host is not None:
        context = ssl.create_default_context()
    async with asyncio.timeout(timeout_s):
        reader, writer = await asyncio.open_connection(host, int(port), ssl=context,
                                                       server_hostname=tls_host if context else None,
                                                       limit=64 * 1024)
        try:
            writer.write(f"GET /metrics HTTP/1.1\r\nHost: {endpoint}\r\nAccept: text/plain\r\n"
                         "Accept-Encoding: identity\r\nConnection: close\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status_line, *header_lines = head.decode("latin-1").split("\r\n")
            parts = status_line.split(" ")
            if len(parts) < 2 or parts[1] != "200":
                raise ValueError(f"status {status_line!r}")
            pairs = (line.partition(":") for line in header_lines if line)
            headers = {k.strip().lower(): v.strip() for k, _, v in pairs}
            length = headers.get("content-length")
            if length is not None:
                if not length.isdigit() or int(length) > limit:
                    raise ValueError(f"content-length {length}")
                return await reader.readexactly(int(length))
            body = bytearray()
            while len(body) <= limit:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                body += chunk
            if len(body) > limit:
                raise ValueError(f"more than {limit} bytes")
            if headers.get("transfer-encoding", "").lower() == "chunked":
                return _unchunk(bytes(body))
            return bytes(body)
        finally:
            writer.close()


def _unchunk(data: bytes) -> bytes:
    out, at = bytearray(), 0
    while True:
        end = data.find(b"\r\n", at)
        if end == -1:
            raise ValueError("truncated chunked body")
        size = int(data[at:end].split(b";")[0], 16)
        if size == 0:
            return bytes(out)
        out += data[end + 2:end + 2 + size]
        at = end + 2 + size + 2


class EndpointScraper:
    """Scrapes every pool endpoint of the table in force into `state`, while there are pools."""

    def __init__(self, state: EndpointState, pools: Callable[[], Mapping[str, Pool]],
                 clock: Callable[[], float] = time.time, interval_s: float = INTERVAL_S,
                 timeout_s: float = TIMEOUT_S, limit: int = LIMIT):
        self._state = state
        self._pools = pools
        self._clock = clock
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self.limit = limit
        self._busy: set[str] = set()  # endpoints with a scrape under way
        self._tasks: set[asyncio.Task[None]] = set()
        self._seen: Mapping[str, Pool] | None = None
        self.failures: dict[str, str] = {}  # endpoint -> why its last scrape failed (debug, `extproc route`)

    async def run(self) -> None:
        try:
            while True:
                pools = self._pools()
                if pools is not self._seen:
                    self._seen = pools
                    self._state.keep_only(pools)
                for pool in pools.values():
                    tls_host = pool.host if pool.protocol == "https" else None
                    for endpoint in pool.endpoints:
                        if endpoint not in self._busy:
                            self._busy.add(endpoint)
                            task = asyncio.create_task(self._scrape(endpoint, tls_host))
                            self._tasks.add(task)
                            task.add_done_callback(self._tasks.discard)
                await asyncio.sleep(self.interval_s)
        finally:
            for task in list(self._tasks):
                task.cancel()

    async def _scrape(self, endpoint: str, tls_host: str | None) -> None:
        try:
            sent = self._state.sent_total.get(endpoint, 0)  # what it can already see
            text = await fetch_metrics(endpoint, tls_host, self.timeout_s, self.limit)
            load = parse_load(text, self._clock(), sent)
            if load is None:
                raise ValueError("no load metrics in the answer")
            self._state.loaded(endpoint, load)
            self.failures.pop(endpoint, None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # refused, slow, huge, garbage: the last good load stays, until stale
            why = f"{type(exc).__name__}: {exc}"[:200]
            if self.failures.get(endpoint) is None:
                log.info("model server %s: metrics not read (%s); its last load stays until stale", endpoint, why)
            self.failures[endpoint] = why
        finally:
            self._busy.discard(endpoint)


async def scrape_once(pool: Pool, clock: Callable[[], float] = time.time,
                      timeout_s: float = TIMEOUT_S) -> tuple[EndpointState, dict[str, str]]:
    """Each endpoint of `pool` scraped once (for `extproc route`): the picker's state, and why
    each endpoint that could not be read was not."""
    state = EndpointState()
    scraper = EndpointScraper(state, lambda: {pool.host: pool}, clock, timeout_s=timeout_s)
    tls_host = pool.host if pool.protocol == "https" else None
    await asyncio.gather(*(scraper._scrape(endpoint, tls_host) for endpoint in pool.endpoints))
    return state, dict(scraper.failures)
