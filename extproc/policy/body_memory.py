"""Admission by memory: a cap on request-body bytes held at once across all ext_proc streams.

Every request body is held whole by the ext_proc until it is rewritten (the provider's model
and key go into it). Body size is bounded per request (`--body-limit`), but not their sum: 40
concurrent 8 MiB bodies took the process from 61 MiB to over 300 MiB, and a control plane with
a 512 MiB limit that is OOM-killed fails every sidecar's LLM traffic. So a body that would take
the bytes held past the cap is refused at once with a JSON 503 (`overloaded`, `Retry-After`),
before its bytes arrive when its `content-length` says how many will; smaller requests keep
flowing.

After a burst the freed body buffers are handed back to the kernel (`malloc_trim`), keeping the
warm heap `extproc.ops.malloc` keeps for the next body.

The same object counts the ext_proc streams open, which a graceful drain waits for.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..errors import OVERLOADED_CODE, OVERLOADED_HEADERS, OVERLOADED_TYPE, GatewayError

log = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES_IN_FLIGHT = 256 << 20
TRIM_AFTER_BYTES = 64 << 20  # a burst that held more than this is given back when it is over


class Overloaded(GatewayError):
    """503 with `Retry-After`: the gateway is busy with big bodies, not broken; try again soon."""

    headers = OVERLOADED_HEADERS

    def __init__(self, size: int, cap: int):
        super().__init__(503, f"the gateway is holding too many request bodies right now (a body of {size} bytes "
                              f"would pass its limit of {cap} bytes in flight); retry in a moment", OVERLOADED_CODE,
                         OVERLOADED_TYPE)


class Inflight:
    """Streams open and body bytes held, with the cap on the bytes. Single-threaded (the event
    loop's); `take`/`give_back` are the only operations on the request path."""

    def __init__(self, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
                 trim: Callable[[], object] | None = None):
        self.cap = max_body_bytes
        self.held = 0
        self.streams = 0
        self.opened = 0  # streams ever opened (this process's share of the requests)
        self.refused = 0
        self._peak = 0  # most bytes held since the last trim
        self._trim = trim  # called (soon, from the loop) once a big burst is over

    def take(self, size: int) -> bool:
        """Hold `size` more bytes, or False (and a refusal counted) if that passes the cap."""
        if self.held + size > self.cap:
            self.refused += 1
            return False
        self.held += size
        if self.held > self._peak:
            self._peak = self.held
        return True

    def give_back(self, size: int) -> None:
        self.held -= size
        if self.held == 0 and self._peak > TRIM_AFTER_BYTES and self._trim is not None:
            self._peak = 0
            try:
                # after the current callback: the stream that gave the last bytes back drops its body then
                asyncio.get_running_loop().call_soon(self._trim)
            except RuntimeError:  # no loop (unit tests): now
                self._trim()


def register_metrics(registry: CollectorRegistry, inflight: Inflight, worker: str = "0") -> None:
    """Gauges of what is held now, and the refusals so far, read when /metrics is scraped. With
    worker processes (extproc.ops.workers) every series is their sum, but for the streams opened,
    which has one series per process (`worker`: 0 is the main one)."""
    class _Collector(Collector):
        def collect(self) -> Iterator[Metric]:
            yield GaugeMetricFamily("llm_gateway_body_bytes_in_flight",
                                    "Request-body bytes the ext_proc holds now, across all streams",
                                    value=inflight.held)
            yield GaugeMetricFamily("llm_gateway_body_bytes_in_flight_limit",
                                    "The cap on request-body bytes held at once (--max-body-bytes-in-flight)",
                                    value=inflight.cap)
            yield CounterMetricFamily("llm_gateway_overload_refusals",
                                      "Requests answered 503 overloaded: their body would have passed the cap",
                                      value=inflight.refused)
            yield GaugeMetricFamily("llm_gateway_ext_proc_streams", "ext_proc streams (requests) open now",
                                    value=inflight.streams)
            opened = CounterMetricFamily("llm_gateway_ext_proc_streams_opened",
                                         "ext_proc streams opened, by process (one per request)", labels=["worker"])
            opened.add_metric([worker], inflight.opened)
            yield opened

    registry.register(_Collector())
