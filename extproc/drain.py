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
from typing import Callable

log = logging.getLogger("extproc.drain")

HEALTH_CHECK = "/grpc.health.v1.Health/Check"
DEFAULT_GRACE_S = 25.0  # below Kubernetes' default terminationGracePeriodSeconds of 30
NOTICE_S = 3.0  # Envoy's health check runs every second and marks a host down at its first failure

# grpc.health.v1.HealthCheckResponse {status: SERVING (1) | NOT_SERVING (2)}, field 1 as a varint
_SERVING, _NOT_SERVING = b"\x08\x01", b"\x08\x02"


class HealthCheck:
    """One gRPC health check call (Envoy's active health check of the ext_proc cluster)."""

    __slots__ = ("_serving",)

    def __init__(self, serving: Callable[[], bool]):
        self._serving = serving

    def on_message(self, message: bytes) -> tuple[bytes, bool]:
        return (_SERVING if self._serving() else _NOT_SERVING), True


def drain_plan(grace_s: float, notice_s: float = NOTICE_S) -> tuple[float, float]:
    """How long to keep serving while health checks say NOT_SERVING, then how long streams in
    flight may still take: the notice takes at most half the grace period."""
    notice = min(notice_s, grace_s / 2)
    return notice, grace_s - notice


async def drain(control, grace_s: float, notice_s: float = NOTICE_S) -> int:
    """Drain `control` (a `ControlPlane`); returns the ext_proc streams still open at the end
    (0 when every request in flight finished)."""
    notice, rest = drain_plan(grace_s, notice_s)
    control.draining = True
    log.info("draining: health checks say NOT_SERVING; %.1fs for Envoy to notice, then up to %.1fs for %d "
             "requests in flight", notice, rest, control.inflight.streams)
    await asyncio.sleep(notice)
    server = getattr(control, "_ext_proc_server", None)
    if server is not None:
        server.close()  # no new connections; the open ones stay
    for connection in list(control.connections):
        connection.go_away()
    xds = getattr(control, "_server", None)
    xds_stopped = asyncio.ensure_future(xds.stop(0.5)) if xds is not None else None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + rest
    while control.inflight.streams > 0 and loop.time() < deadline:
        await asyncio.sleep(0.05)
    left = control.inflight.streams
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
    import urllib.request

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


MAX_STREAMS_PER_CONNECTION = 1000


def replica_failover(cluster: dict) -> dict:
    """Envoy's ext_proc cluster made to fail no new request when a replica goes away: an active
    gRPC health check (a draining replica says NOT_SERVING and gets no new stream), and outlier
    detection that ejects a replica at its first refused connection (one killed outright). With
    a single replica (`up`) an unhealthy host is still used (panic mode). A connection carries
    at most MAX_STREAMS_PER_CONNECTION streams, so Envoy's few long-lived connections are renewed
    now and then: each new one lands on a worker process of the kernel's choice (SO_REUSEPORT),
    and on a new replica after a scale-up."""
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["common_http_protocol_options"] = {"max_requests_per_connection": MAX_STREAMS_PER_CONNECTION}
    return {**cluster,
        "health_checks": [{
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
            "unhealthy_threshold": 1, "healthy_threshold": 1,
            "grpc_health_check": {},
        }],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 100,
        },
    }


def readiness_listener(address) -> dict:
    """A listener for the sidecar's readiness probe (GET /ready: 200, or 503 once Envoy is
    draining), so the kubelet never needs Envoy's admin interface, which must stay on loopback."""
    from .envoy_config import _address

    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm_gateway_readiness",
        "http_filters": [
            {"name": "envoy.filters.http.health_check",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
                              "pass_through_mode": False,
                              "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}]}},
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
        "route_config": {"virtual_hosts": [{"name": "readiness", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
    }
    return {"name": "llm_gateway_readiness", "address": _address(address),
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                            "typed_config": hcm}]}]}
