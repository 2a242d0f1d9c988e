"""Whether each provider's host name resolves, as the control plane last found it: pure state
and decisions, the lookups themselves are `extproc.ops.address_watch`'s.

Envoy resolves provider names itself and never waits for them (`extproc.envoy.clusters.
resolving`); a provider whose name does not resolve has no address there, and its requests get
a 503 `provider_address_unknown`, which Envoy does not retry. So the control plane asks the
same resolver the same names, and what it finds is used:

- by failover: providers whose name does not resolve are left out of attempt orders like
  providers cooling down (`RoutingTable.unresolved`, read by `extproc.policy.decide`), so a
  rule with fallbacks goes on to the next provider at once;
- for people: a warning naming the host once when it stops resolving (and a line when it
  resolves again), the `llm_gateway_provider_address_resolved` gauge, and in Kubernetes an
  `AddressResolved` condition on the LLMProvider.

A name is looked up when it first appears; a name that does not resolve again after 1 s, then
less often (doubling, up to every 30 s), so one that starts resolving is served within
seconds; a name that resolves again every minute.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily

RECHECK_S = 60.0  # a resolved name, asked again
RETRY_BASE_S = 1.0  # a name that did not resolve: asked again after this, doubling ...
RETRY_MAX_S = 30.0  # ... up to this


class Resolution(enum.Enum):
    RESOLVED = "Resolved"
    NOT_FOUND = "NameNotFound"  # NXDOMAIN: no such name
    NO_ADDRESS = "NoAddress"  # the name exists, without an address record
    NO_ANSWER = "NoAnswer"  # the DNS server did not answer in time
    FAILED = "LookupFailed"  # any other failure (SERVFAIL, a refused query, ...)


EXPLAINED = {
    Resolution.RESOLVED: "resolves",
    Resolution.NOT_FOUND: "does not exist in DNS (NXDOMAIN)",
    Resolution.NO_ADDRESS: "has no address record",
    Resolution.NO_ANSWER: "got no answer from the DNS server in time",
    Resolution.FAILED: "could not be looked up",
}


@dataclass(frozen=True, slots=True)
class Lookup:
    """What one lookup of a name found."""

    resolution: Resolution
    detail: str = ""  # the resolver's words (an error), or the addresses found

    @property
    def resolved(self) -> bool:
        return self.resolution is Resolution.RESOLVED

    def describe(self, name: str) -> str:
        text = f"{name} {EXPLAINED[self.resolution]}"
        return f"{text} ({self.detail})" if self.detail else text


@dataclass(frozen=True, slots=True)
class Change:
    """A name's first verdict, or a changed one: it stopped resolving, or it resolves again."""

    name: str
    lookup: Lookup
    before: Lookup | None  # None: its first lookup


@dataclass(slots=True)
class _Entry:
    last: Lookup | None = None
    failures: int = 0
    due: float = 0.0
    asking: bool = False


class AddressBook:
    """The names being watched, when each is due, and what its last lookup found."""

    def __init__(self, recheck_s: float = RECHECK_S, retry_base_s: float = RETRY_BASE_S,
                 retry_max_s: float = RETRY_MAX_S) -> None:
        self.recheck_s, self.retry_base_s, self.retry_max_s = recheck_s, retry_base_s, retry_max_s
        self._entries: dict[str, _Entry] = {}
        self._queue: list[tuple[float, str]] = []  # (due, name); stale items are skipped
        self.unknown: frozenset[str] = frozenset()  # names whose last lookup failed

    def track(self, names: Iterable[str], now: float) -> bool:
        """Watch exactly these names: new ones are due now, gone ones forgotten. True when the
        set of names that do not resolve changed (a forgotten one was among them)."""
        wanted = {name.lower() for name in names}
        for name in [n for n in self._entries if n not in wanted]:
            del self._entries[name]
        for name in wanted:
            if name not in self._entries:
                self._entries[name] = _Entry(due=now)
                heapq.heappush(self._queue, (now, name))
        unknown = self.unknown & wanted
        changed = unknown != self.unknown
        self.unknown = unknown
        return changed

    def due(self, now: float) -> list[str]:
        """The names to look up now (each handed out once until its result is recorded),
        names never looked up first."""
        ready = []
        while self._queue and self._queue[0][0] <= now:
            when, name = heapq.heappop(self._queue)
            entry = self._entries.get(name)
            if entry is None or entry.asking or entry.due != when:
                continue  # forgotten, already handed out, or re-queued since
            entry.asking = True
            ready.append(name)
        return ready

    def next_due(self) -> float | None:
        return self._queue[0][0] if self._queue else None

    def record(self, name: str, lookup: Lookup, now: float) -> Change | None:
        """A lookup's result; the name is due again later. A Change at its first verdict and
        whenever the verdict changes (it stops resolving, or resolves again)."""
        entry = self._entries.get(name)
        if entry is None:
            return None  # forgotten while it was being looked up
        before = entry.last
        entry.last, entry.asking = lookup, False
        if lookup.resolved:
            entry.failures = 0
            entry.due = now + self.recheck_s
        else:
            entry.due = now + min(self.retry_base_s * 2 ** entry.failures, self.retry_max_s)
            entry.failures += 1
        heapq.heappush(self._queue, (entry.due, name))
        if lookup.resolved:
            self.unknown = self.unknown - {name} if name in self.unknown else self.unknown
        elif name not in self.unknown:
            self.unknown = self.unknown | {name}
        if before is None or before.resolved != lookup.resolved:
            return Change(name, lookup, before)
        return None

    def last(self, name: str) -> Lookup | None:
        entry = self._entries.get(name.lower())
        return entry.last if entry is not None else None

    def __iter__(self) -> Iterator[tuple[str, Lookup | None]]:
        return ((name, entry.last) for name, entry in sorted(self._entries.items()))


class ProviderNames:
    """Provider hosts and the DNS names Envoy resolves for them (the host itself, or the name
    `--resolve HOST=NAME:PORT` gives; none for a fixed IP address), over one AddressBook."""

    def __init__(self, book: AddressBook) -> None:
        self.book = book
        self._names: dict[str, str] = {}  # provider host -> DNS name

    def track(self, names: dict[str, str], now: float) -> bool:
        """Watch these providers (host -> DNS name); True when `unresolved()` may have changed."""
        self._names = {host: name.lower() for host, name in names.items()}
        return self.book.track(self._names.values(), now)

    def unresolved(self) -> frozenset[str]:
        """The provider hosts whose name does not resolve (for failover to leave out)."""
        unknown = self.book.unknown
        if not unknown:
            return frozenset()
        return frozenset(host for host, name in self._names.items() if name in unknown)

    def hosts_of(self, name: str) -> list[str]:
        return sorted(host for host, n in self._names.items() if n == name)

    def lookups(self) -> list[tuple[str, Lookup | None]]:
        return [(host, self.book.last(name)) for host, name in sorted(self._names.items())]


class AddressGauge:
    """`llm_gateway_provider_address_resolved{provider}`: 1 while the provider's name resolves,
    0 while it does not; absent for a name not looked up yet and for providers at a fixed
    address (`--resolve HOST=IP:PORT`)."""

    def __init__(self, providers: ProviderNames) -> None:
        self._providers = providers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily("llm_gateway_provider_address_resolved",
                                  "1 while the provider's host name resolves, 0 while it does not "
                                  "(its requests get a 503 provider_address_unknown; failover skips it)",
                                  labels=["provider"])
        for host, lookup in self._providers.lookups():
            if lookup is not None:
                gauge.add_metric([host], 1.0 if lookup.resolved else 0.0)
        yield gauge
