"""Graceful drain: a stopping ext_proc/xDS server lets every request it has started finish.

On SIGTERM (Kubernetes stopping the pod, a rolling update, `kill`), in this order:
1. Health checks say NOT_SERVING (gRPC health on the ext_proc port, `/readyz` 503), while new
   streams are still served: Envoy's active health check and the Service's endpoints take a
   moment to notice (`notice_s`), and a stream sent meanwhile must not fail.
2. The ext_proc stops accepting connections and sends GOAWAY on each it has: Envoy opens new
   streams elsewhere; streams already open finish. xDS stops taking new streams; Envoy keeps
   its last config and reconnects to another replica.
3. Once no ext_proc stream is open, or the grace period is over, the process exits.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.request

import grpc

from .data_plane import DataPlane

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 25.0  # below Kubernetes' default terminationGracePeriodSeconds of 30
NOTICE_S = 3.0  # Envoy's health check runs every second and marks a host down at its first failure


def drain_plan(grace_s: float, notice_s: float = NOTICE_S) -> tuple[float, float]:
    """How long to keep serving while health checks say NOT_SERVING, then how long streams in
    flight may still take: the notice takes at most half the grace period."""
    notice = min(notice_s, grace_s / 2)
    return notice, grace_s - notice


async def drain(plane: DataPlane, grace_s: float, notice_s: float = NOTICE_S,
                xds: grpc.aio.Server | None = None) -> int:
    """Drain a process's data plane (and its xDS server, if it has one); returns the ext_proc
    streams still open at the end (0 when every request in flight finished)."""
    notice, rest = drain_plan(grace_s, notice_s)
    plane.draining = True
    log.info("draining: health checks say NOT_SERVING; %.1fs for Envoy to notice, then up to %.1fs for %d "
             "requests in flight", notice, rest, plane.inflight.streams)
    await asyncio.sleep(notice)
    plane.stop_listening()  # no new connections; the open ones stay
    for connection in list(plane.connections):
        connection.go_away()
    xds_stopped = asyncio.ensure_future(xds.stop(0.5)) if xds is not None else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rest
    while plane.inflight.streams > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    left = plane.inflight.streams
    if left:
        log.warning("drain: grace period over with %d requests still in flight", left)
    else:
        log.info("drain: every request in flight finished")
    if xds_stopped is not None:
        await xds_stopped
    return left


async def drain_envoy(admin: str, grace_s: float) -> int:
    """Ask Envoy (admin `HOST:PORT`) to drain its listeners (clients are told to close their
    connections: `connection: close`, HTTP/2 GOAWAY), then wait until no request is active or the
    grace period is over. Returns the requests still active."""
    def call(path: str, method: str = "GET") -> str:
        request = urllib.request.Request(f"http://{admin}{path}", method=method)
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.read().decode()

    def active() -> int:
        text = call("/stats?filter=%5Ehttp%5C.llm_gateway%5C.downstream_rq_active%24")
        return sum(int(line.rpartition(":")[2]) for line in text.splitlines() if line.strip())

    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace_s
    try:
        await asyncio.to_thread(call, "/healthcheck/fail", "POST")  # the readiness listener says 503
        await asyncio.to_thread(call, "/drain_listeners?graceful", "POST")
        log.info("draining Envoy's listeners")
        while (left := await asyncio.to_thread(active)) > 0 and loop.time() < deadline:
            await asyncio.sleep(0.1)
    except (OSError, ValueError) as exc:  # Envoy already gone or not answering: nothing to wait for
        log.warning("could not drain Envoy: %s", exc)
        return 0
    return left
