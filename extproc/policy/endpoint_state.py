"""What the endpoint picker knows of each model server, kept per process: its last good load
(written by the scraper, `extproc.dataplane.endpoint_scraper`), the requests this gateway sent
it that have not finished, whether it is ejected after failures, and which endpoint last served
each prompt prefix. Read per request by `extproc.policy.endpoint_picker.pick`; fed by the access
log (finished requests, failed attempts). No I/O; one event loop writes it, `/metrics` reads it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..protocol import METADATA_NAMESPACE, PROVIDER_CLUSTER_PREFIX, UPSTREAM_END
from .endpoint_picker import DEFAULT_SETTINGS, Load, PickerSettings, Ranking, pick
from .passive_health import attempt_reason, is_health_failure
from .table import Pool

PREFIX_MEMORY = 65_536  # prompt-prefix blocks remembered per process (oldest forgotten first)
PREFIX_OWNERS = 4  # endpoints remembered per block (a hot prefix spills over to a second server, a third...)
EJECT_AFTER = 2  # failed attempts in a row
EJECT_S = 30.0


class EndpointState:
    def __init__(self, settings: PickerSettings = DEFAULT_SETTINGS, eject_after: int = EJECT_AFTER,
                 eject_s: float = EJECT_S):
        self.settings = settings
        self.eject_after = eject_after
        self.eject_s = eject_s
        self.loads: dict[str, Load] = {}
        self.outstanding: dict[str, int] = {}
        self.sent_total: dict[str, int] = {}  # requests sent to each, ever (a scrape notes it when it begins)
        self.pool_of: dict[str, str] = {}  # endpoint -> its pool's name (metrics)
        self._failures: dict[str, int] = {}
        self.ejected: dict[str, float] = {}  # endpoint -> until
        # prompt-prefix block -> the endpoints that served it recently (their caches likely hold it)
        self._prefixes: OrderedDict[int, dict[str, None]] = OrderedDict()
        self.picked: dict[tuple[str, str], int] = {}  # (pool, endpoint) -> requests sent
        self.failed_attempts: dict[tuple[str, str, str], int] = {}  # (pool, endpoint, reason) -> count
        self._tie = 0

    # ------------------------------------------------------------------ per request

    def rank(self, pool: Pool, now: float, hashes: tuple[int, ...] = (), adapter: str | None = None) -> Ranking:
        """The pool's endpoints ranked for a request with these prompt-prefix hashes and model."""
        ejected = self._ejected(now) if self.ejected else frozenset()
        prefix: dict[str, float] | None = None
        if hashes:
            prefixes, prefix = self._prefixes, {}
            for i in range(len(hashes) - 1, -1, -1):  # each endpoint's longest known prefix
                owners = prefixes.get(hashes[i])
                if owners is not None:
                    for owner in owners:
                        prefix.setdefault(owner, (i + 1) / len(hashes))
                    if len(prefix) >= len(pool.endpoints):
                        break
        self._tie += 1
        return pick(pool.endpoints, self.loads, self.outstanding, now, ejected, prefix, adapter, self.settings,
                    self._tie, self.sent_total)

    def sent(self, pool: Pool, endpoint: str, hashes: tuple[int, ...] = ()) -> None:
        """A request goes to `endpoint`: counted in flight, and its prompt's prefix remembered there."""
        self.outstanding[endpoint] = self.outstanding.get(endpoint, 0) + 1
        self.sent_total[endpoint] = self.sent_total.get(endpoint, 0) + 1
        self.pool_of[endpoint] = pool.name
        key = (pool.name, endpoint)
        self.picked[key] = self.picked.get(key, 0) + 1
        if hashes:
            prefixes = self._prefixes
            for h in hashes:
                owners = prefixes.get(h)
                if owners is None:
                    owners = prefixes[h] = {}
                else:
                    prefixes.move_to_end(h)
                owners.pop(endpoint, None)
                owners[endpoint] = None  # the latest last
                if len(owners) > PREFIX_OWNERS:
                    del owners[next(iter(owners))]
            while len(prefixes) > PREFIX_MEMORY:
                prefixes.popitem(last=False)

    # ------------------------------------------------------------------ fed by the access log

    def finished(self, endpoint: str) -> None:
        count = self.outstanding.get(endpoint, 0)
        if count > 0:
            self.outstanding[endpoint] = count - 1

    def failed(self, endpoint: str, reason: str, now: float) -> bool:
        """A failed attempt (refused, reset, 5xx, 429); True when it ejects the endpoint."""
        key = (self.pool_of.get(endpoint, ""), endpoint, reason)
        self.failed_attempts[key] = self.failed_attempts.get(key, 0) + 1
        failures = self._failures[endpoint] = self._failures.get(endpoint, 0) + 1
        if failures >= self.eject_after and self.ejected.get(endpoint, 0.0) <= now:
            self.ejected[endpoint] = now + self.eject_s
            return True
        return False

    def succeeded(self, endpoint: str) -> None:
        if self._failures.pop(endpoint, 0):
            self.ejected.pop(endpoint, None)

    def _ejected(self, now: float) -> frozenset[str]:
        for endpoint in [e for e, until in self.ejected.items() if until <= now]:
            del self.ejected[endpoint]  # back in: one more failure ejects it again
            self._failures[endpoint] = self.eject_after - 1
        return frozenset(self.ejected)

    # ------------------------------------------------------------------ fed by the scraper

    def loaded(self, endpoint: str, load: Load) -> None:
        self.loads[endpoint] = load

    def keep_only(self, pools: Mapping[str, Pool]) -> None:
        """Forget endpoints no pool has any more (scaled down, deleted)."""
        current = {e for pool in pools.values() for e in pool.endpoints}
        for table in (self.loads, self.outstanding, self.sent_total, self._failures, self.ejected, self.pool_of):
            for endpoint in [e for e in table if e not in current]:
                del table[endpoint]
        for pool in pools.values():
            for endpoint in pool.endpoints:
                self.pool_of[endpoint] = pool.name


class EndpointMetrics:
    """`llm_gateway_endpoint_*`: per pool and endpoint, what the picker sees and did."""

    def __init__(self, state: EndpointState, clock: Callable[[], float], registry: CollectorRegistry):
        self._state = state
        self._clock = clock
        registry.register(self)

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        state, now = self._state, self._clock()
        labels = ["pool", "endpoint"]
        picked = CounterMetricFamily("llm_gateway_endpoint_picked", "Requests sent to each model server", labels=labels)
        for (pool, endpoint), count in list(state.picked.items()):
            picked.add_metric([pool, endpoint], count)
        failed = CounterMetricFamily("llm_gateway_endpoint_failed_attempts",
                                     "Failed attempts at each model server (refused, reset, 5xx, 429)",
                                     labels=[*labels, "reason"])
        for (pool, endpoint, reason), count in list(state.failed_attempts.items()):
            failed.add_metric([pool, endpoint, reason], count)
        waiting = GaugeMetricFamily("llm_gateway_endpoint_queue", "Requests waiting at each model server (last scrape)",
                                    labels=labels)
        kv = GaugeMetricFamily("llm_gateway_endpoint_kv_cache_usage", "KV-cache use of each model server, 0 to 1",
                               labels=labels)
        stale = GaugeMetricFamily("llm_gateway_endpoint_stale", "1 while a model server's metrics are stale",
                                  labels=labels)
        ejected = GaugeMetricFamily("llm_gateway_endpoint_ejected", "1 while a model server is ejected after failures",
                                    labels=labels)
        outstanding = GaugeMetricFamily("llm_gateway_endpoint_outstanding",
                                        "Requests this gateway sent each model server that have not finished",
                                        labels=labels)
        for endpoint, pool in list(state.pool_of.items()):
            load = state.loads.get(endpoint)
            if load is not None:
                waiting.add_metric([pool, endpoint], load.waiting)
                kv.add_metric([pool, endpoint], load.kv_usage)
            fresh = load is not None and now - load.at <= state.settings.stale_s
            stale.add_metric([pool, endpoint], 0.0 if fresh else 1.0)
            ejected.add_metric([pool, endpoint], 1.0 if state.ejected.get(endpoint, 0.0) > now else 0.0)
            outstanding.add_metric([pool, endpoint], state.outstanding.get(endpoint, 0))
        yield from (picked, failed, waiting, kv, stale, ejected, outstanding)


class EndpointObserver:
    """The access log, for the endpoint picker: a finished request is no longer outstanding at
    its endpoint (the `endpoint` entry of its metadata); a failed attempt at a pool's endpoint
    (refused, reset, 5xx, 429) counts against it and, repeated, ejects it for a while; an
    answered one clears it."""

    def __init__(self, state: EndpointState, pools: Callable[[], Mapping[str, Pool]],
                 hosts: Callable[[], Mapping[str, str]], clock: Callable[[], float] = time.time):
        self._state = state
        self._pools = pools
        self._hosts = hosts  # cluster -> host (the table's cluster_hosts)
        self._clock = clock

    def active(self) -> bool:
        return bool(self._pools())

    def observe(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        common = entry.common_properties
        state = self._state
        if common.access_log_type != UPSTREAM_END:
            decided = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
            if decided is not None and "endpoint" in decided.fields:
                state.finished(decided.fields["endpoint"].string_value)
        host = self._hosts().get(common.upstream_cluster)
        if host is None or host not in self._pools():
            return
        address = common.upstream_remote_address.socket_address
        if not address.address:
            return  # no endpoint was connected to at all
        endpoint = f"[{address.address}]:{address.port_value}" if ":" in address.address \
            else f"{address.address}:{address.port_value}"
        status = entry.response.response_code.value
        if is_health_failure(status):
            # a request's own entry, where its attempts were not logged apart (a rule without retries)
            if common.access_log_type == UPSTREAM_END or common.upstream_cluster.startswith(PROVIDER_CLUSTER_PREFIX):
                state.failed(endpoint, attempt_reason(entry), self._clock())
        else:
            state.succeeded(endpoint)
