"""Envoy's access log entries, read for failover: metrics per attempt and passive health.

Envoy's router logs each failed attempt of a request with an attempt order (an `UpstreamEnd`
entry) on the same stream as the requests' own entries, before the request's entry; a request
without one made one attempt, read from its own entry. A failed attempt counts against its
provider's health; a request answered by a provider (its final attempt) clears it. Metrics:
attempts by provider and result, failovers by provider and reason, and a cool-down gauge.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Callable

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from .failover import PassiveHealth, is_health_failure
from .names import PROVIDER_CLUSTER_PREFIXES, host_of_cluster
from .series import Counter  # updated per finished request: the cheap kind

UPSTREAM_END = accesslog_pb2.AccessLogType.Value("UpstreamEnd")
_MAX_PENDING = 10_000  # failed attempts waiting for their request's entry


def attempt_reason(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """Why an attempt failed: connect_failure, tls, timeout, reset, or the status code."""
    common = entry.common_properties
    flags = common.response_flags
    failure = common.upstream_transport_failure_reason.lower()
    if flags.upstream_connection_failure or flags.no_healthy_upstream:
        return "tls" if ("tls" in failure or "certificate" in failure or "ssl" in failure) else "connect_failure"
    if flags.upstream_request_timeout:
        return "timeout"
    status = entry.response.response_code.value
    if status:
        return str(status)
    if flags.upstream_remote_reset or flags.upstream_connection_termination:
        return "reset"
    return "no_answer"


class FailoverObserver:
    def __init__(self, health: PassiveHealth, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.time, hosts: Callable[[], dict[str, str]] = dict):
        self.health = health
        self._clock = clock
        self._hosts = hosts  # cluster -> provider host, of the config in force
        self._pending: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()  # request id -> [(host, reason)]
        self.attempts = Counter("llm_gateway_provider_attempts",
                                "Attempts sent to a provider, by result: ok, or why it failed "
                                "(status code, connect_failure, tls, timeout, reset)",
                                ("provider", "result"), registry=registry)
        self.failovers = Counter("llm_gateway_failovers",
                                 "Failed attempts after which the request went on to the next provider",
                                 ("provider", "reason"), registry=registry)
        self._ok: dict[str, object] = {}
        registry.register(_CoolingGauge(health, clock))

    def _host(self, cluster: str) -> str:
        return self._hosts().get(cluster) or host_of_cluster(cluster) or cluster

    def observe(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        common = entry.common_properties
        if common.access_log_type == UPSTREAM_END:
            self._failed_attempt(entry)
        elif common.upstream_cluster.startswith(PROVIDER_CLUSTER_PREFIXES):
            self._request(entry)

    def _failed_attempt(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        status = entry.response.response_code.value
        if not is_health_failure(status):
            return
        host, reason = self._failed(entry)
        request_id = entry.request.request_id
        if request_id:
            self._pending.setdefault(request_id, []).append((host, reason))
            while len(self._pending) > _MAX_PENDING:
                self._pending.popitem(last=False)

    def _failed(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> tuple[str, str]:
        host, reason = self._host(entry.common_properties.upstream_cluster), attempt_reason(entry)
        self.attempts.labels(host, reason).inc()
        self.health.failed(host, self._clock())
        return host, reason

    def _request(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        common = entry.common_properties
        final = self._host(common.upstream_cluster)
        failed = self._pending.pop(entry.request.request_id, []) if self._pending else []
        tried = common.upstream_request_attempt_count or 1
        # every attempt but the last was a failover; the last one's failure (if any) was counted
        for host, reason in failed[: max(tried - 1, 0)]:
            self.failovers.labels(host, reason).inc()
        status = entry.response.response_code.value
        if failed and len(failed) >= tried:
            return  # the final attempt failed too: counted with the failed attempts
        if not failed and status and is_health_failure(status):
            self._failed(entry)  # no attempt order: its one attempt was not logged apart (0: the client left)
            return
        if status and not is_health_failure(status):  # answered: a 4xx is the client's fault, not the provider's
            ok = self._ok.get(final)
            if ok is None:
                ok = self._ok[final] = self.attempts.labels(final, "ok")
            ok.inc()
            self.health.succeeded(final)


class _CoolingGauge:
    """`llm_gateway_provider_cooling_down{provider}`: 1 while a provider is skipped."""

    def __init__(self, health: PassiveHealth, clock: Callable[[], float]):
        self._health = health
        self._clock = clock

    def collect(self):
        gauge = GaugeMetricFamily("llm_gateway_provider_cooling_down",
                                  "1 while a provider is cooling down (skipped by failover after consecutive failures)",
                                  labels=["provider"])
        for host, cooling in self._health.gauge(self._clock()).items():
            gauge.add_metric([host], 1.0 if cooling else 0.0)
        yield gauge
