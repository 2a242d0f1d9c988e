"""Passive health of providers, fed by Envoy's access log, read by failover per request.

A provider that failed `consecutive_errors` attempts in a row cools down for `cool_down_s`
(failover leaves it out of attempt orders); after it, one more failure cools it down again, one
success clears it.

Envoy's router logs each failed attempt of a request with an attempt order (an `UpstreamEnd`
entry) on the same stream as the requests' own entries, before the request's entry; a request
without one made one attempt, read from its own entry. A failed attempt counts against its
provider's health; a request answered by a provider (its final attempt) clears it. Metrics:
attempts by provider and result, failovers by provider and reason, and a cool-down gauge.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from ..protocol import PROVIDER_CLUSTER_PREFIXES, UPSTREAM_END, host_of_cluster
from ..telemetry.fast_series import Counter, CounterSeries  # updated per finished request: the cheap kind

DEFAULT_CONSECUTIVE_ERRORS = 3
DEFAULT_COOL_DOWN_S = 30.0
_MAX_PENDING = 10_000  # failed attempts waiting for their request's entry


def is_health_failure(status: int) -> bool:
    """A failure that counts against a provider's health: 5xx, 429, no answer at all."""
    return status == 0 or status == 429 or status >= 500


@dataclass
class _Health:
    failures: int = 0
    cooling_until: float = 0.0


@dataclass
class PassiveHealth:
    """Consecutive failures per provider host, and who is cooling down. Fed from Envoy's access
    log (failed attempts, and each request's final answer); read by the ext_proc per request."""

    thresholds: dict[str, tuple[int, float]] = field(default_factory=dict)  # host -> (errors, cool-down s)
    _state: dict[str, _Health] = field(default_factory=dict)
    _cooling: dict[str, float] = field(default_factory=dict)  # host -> until; only hosts cooling now
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def configure(self, thresholds: Mapping[str, tuple[int, float]]) -> None:
        with self._lock:
            self.thresholds = dict(thresholds)

    def failed(self, host: str, now: float) -> bool:
        """A failed attempt; True when it starts a cool-down."""
        errors, period = self.thresholds.get(host, (DEFAULT_CONSECUTIVE_ERRORS, DEFAULT_COOL_DOWN_S))
        with self._lock:
            state = self._state.setdefault(host, _Health())
            state.failures += 1
            if state.failures >= errors and state.cooling_until <= now:
                state.cooling_until = now + period
                self._cooling[host] = state.cooling_until
                return True
            return False

    def succeeded(self, host: str) -> None:
        state = self._state.get(host)
        if state is not None and state.failures:
            with self._lock:
                state.failures = 0
                state.cooling_until = 0.0
                self._cooling.pop(host, None)

    def cooling(self, now: float) -> dict[str, float]:
        """Hosts cooling down now (an empty dict, the usual case, costs nothing to test)."""
        if not self._cooling:
            return self._cooling
        with self._lock:
            for host in [h for h, until in self._cooling.items() if until <= now]:
                del self._cooling[host]  # its period is over: tried again (one failure cools it again)
            return dict(self._cooling)

    def gauge(self, now: float) -> dict[str, bool]:
        """Every provider host seen or configured: cooling down now or not."""
        cooling = self.cooling(now)
        hosts = set(self.thresholds) | set(self._state)
        return {host: host in cooling for host in sorted(hosts)}


def attempt_reason(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """Why an attempt failed: address_unknown (its name did not resolve), connect_failure, tls,
    timeout, reset, or the status code."""
    common = entry.common_properties
    flags = common.response_flags
    failure = common.upstream_transport_failure_reason.lower()
    if flags.no_healthy_upstream:
        return "address_unknown"
    if flags.upstream_connection_failure:
        return "tls" if ("tls" in failure or "certificate" in failure or "ssl" in failure) else "connect_failure"
    if flags.upstream_request_timeout:
        return "timeout"
    status = entry.response.response_code.value
    if status:
        return str(status)
    if flags.upstream_remote_reset or flags.upstream_connection_termination:
        return "reset"
    return "no_answer"


class AttemptObserver:
    """Failed attempts and answered requests, from the access log: passive health and the
    attempt metrics."""

    def __init__(self, health: PassiveHealth, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.time, hosts: Callable[[], dict[str, str]] = dict):
        self.health = health
        self._clock = clock
        self._hosts = hosts  # cluster -> provider host, of the config in force
        self._pending: OrderedDict[str, list[tuple[str, str]]] = OrderedDict()  # request id -> [(host, reason)]
        self.attempts = Counter("llm_gateway_provider_attempts",
                                "Attempts sent to a provider, by result: ok, or why it failed "
                                "(status code, address_unknown, connect_failure, tls, timeout, reset)",
                                ("provider", "result"), registry=registry)
        self.failovers = Counter("llm_gateway_failovers",
                                 "Failed attempts after which the request went on to the next provider",
                                 ("provider", "reason"), registry=registry)
        self._ok: dict[str, CounterSeries] = {}
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

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("llm_gateway_provider_cooling_down",
                                  "1 while a provider is cooling down (skipped by failover after consecutive failures)",
                                  labels=["provider"])
        for host, cooling in self._health.gauge(self._clock()).items():
            gauge.add_metric([host], 1.0 if cooling else 0.0)
        yield gauge
