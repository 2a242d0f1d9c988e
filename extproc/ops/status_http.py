"""The operations endpoint: `/metrics` (Prometheus), `/healthz` and `/readyz` (for probes), and
`/spend` (who spent what, as JSON; docs/cost.md: from Redis across instances where budgets share
one, else this process's counters).

A few lines of asyncio rather than a web framework: four fixed GET paths, nothing else.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from collections.abc import Callable

import orjson
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from ..envoy.addresses import HostPort
from ..telemetry.spend import spend_report
from ..telemetry.spend_redis import SpendStore, parse_day

log = logging.getLogger(__name__)


class StatusServer:
    def __init__(self, registry: CollectorRegistry | Collector, ready: Callable[[], bool],
                 degraded: Callable[[], str | None] | None = None, spend_since: float | None = None,
                 spend_store: SpendStore | None = None):
        self._registry = registry
        self._spend_since = spend_since  # when this process's spend counters started
        self._spend_store = spend_store  # every instance's spend, in the Redis budgets share
        self._ready = ready
        self._degraded = degraded  # why the gateway serves in a degraded mode, or None
        self._server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self, listen: HostPort) -> int:
        self._server = await asyncio.start_server(self._handle, listen.host, listen.port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", listen.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        if self._spend_store is not None:
            await self._spend_store.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = await asyncio.wait_for(self._read_head(reader), 5)
            parts = request_line.decode("latin-1").split()
            method, target = (parts[0], parts[1]) if len(parts) >= 2 else ("", "")
            path, _, query = target.partition("?")
            if path == "/spend" and method in ("GET", "HEAD"):
                status, content_type, body = await self._spend(query)
            else:
                status, content_type, body = self._answer(method, path, query)
            head = (f"HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {len(body)}\r\n"
                    "connection: close\r\n\r\n").encode()
            writer.write(head + (body if method != "HEAD" else b""))
            await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):  # slow, gone, or oversized: drop it
            pass
        finally:
            writer.close()

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> bytes:
        """The request line; the headers are read and dropped (none is needed)."""
        request_line = await reader.readline()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        return request_line

    def _answer(self, method: str, path: str, query: str = "") -> tuple[str, str, bytes]:
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"method not allowed\n"
        if path == "/metrics":
            return "200 OK", CONTENT_TYPE_LATEST, generate_latest(self._registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            if self._ready():
                reason = self._degraded() if self._degraded is not None else None
                if reason:  # still serving: taking the instance out would not help
                    return "200 OK", "text/plain", f"ready, degraded: {reason}\n".encode()
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", b"not ready: no config loaded yet\n"
        return "404 Not Found", "text/plain", b"not found: try /metrics, /spend, /healthz or /readyz\n"

    async def _spend(self, query: str) -> tuple[str, str, bytes]:
        """`/spend?by=caller,model&since=2026-05-01&source=redis`: who spent what, as a JSON report:
        from Redis (every instance sharing it; `since` a UTC day, default the first one kept) where
        budgets share one, else (or with `source=process`) this process's counters, summed over
        its workers, since it started."""
        params = urllib.parse.parse_qs(query)
        wanted = params.get("by", ["caller,model,route"])[-1]
        by = [g.strip() for g in wanted.split(",") if g.strip()]
        source = params.get("source", ["redis" if self._spend_store is not None else "process"])[-1]
        try:
            if source == "redis":
                if self._spend_store is None:
                    return _error("400 Bad Request", "spend is kept in Redis only where budgets share one (--redis): "
                                  "use source=process", "spend_not_shared")
                since = params.get("since", [""])[-1]
                try:
                    report = await self._spend_store.report(by, parse_day(since) if since else None)
                except (RedisError, OSError, TimeoutError) as exc:  # unreachable or slow: say so, never a trace
                    return _error("503 Service Unavailable", f"cannot read spend from Redis ({type(exc).__name__}): "
                                  "try again, or source=process for this process's counts", "spend_unavailable")
            elif source == "process":
                report = spend_report(self._registry.collect(), by, self._spend_since)
            else:
                return _error("400 Bad Request", f"source must be redis or process (got {source!r})",
                              "invalid_source")
        except ValueError as exc:
            code = "invalid_since" if "since" in str(exc) else "invalid_group"
            return _error("400 Bad Request", str(exc), code)
        return "200 OK", "application/json", orjson.dumps(report, option=orjson.OPT_INDENT_2)


def _error(status: str, message: str, code: str) -> tuple[str, str, bytes]:
    return status, "application/json", orjson.dumps({"error": {"message": message, "code": code}})
