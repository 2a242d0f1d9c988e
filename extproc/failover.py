"""Failover across providers: pure decisions (docs/failover.md).

- the attempt order of a request: the weighted pick, the rule's other backendRefs by weight
  (highest first), then its fallbackRefs; no provider twice; providers cooling down left out
  (all of them cooling: the pick alone, tried anyway); at most 1 + attempts long;
- the retry policy as the request headers Envoy's router reads;
- passive health: a provider that failed `consecutive_errors` attempts in a row cools down for
  `cool_down_s`; after it, one more failure cools it down again, one success clears it.

Envoy does the retrying; these decide what it is told.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, replace
from typing import Iterable, Mapping

from .names import failover_cluster
from .routing import Target

# Larger request bodies are sent without failover (one attempt, as without `retries`): Envoy 1.40
# does not retry them, or crashes in the retried attempt's upstream filters (seen end to end).
FAILOVER_BODY_MAX = 1_000_000
DEFAULT_CONSECUTIVE_ERRORS = 3
DEFAULT_COOL_DOWN_S = 30.0


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int  # further attempts after the first
    per_try_timeout_s: float | None  # time to the first byte of one attempt's answer
    retry_on: tuple[str, ...]  # Envoy retry conditions: connect-failure, reset, 5xx, ...
    status_codes: tuple[int, ...]  # retried status codes (429, 503, ...)

    @classmethod
    def from_config(cls, attempts: int, per_try_timeout_s: float | None, retry_on: Iterable[str | int]) -> "RetryPolicy":
        conditions = tuple(dict.fromkeys(str(v) for v in retry_on if not str(v).isdigit()))
        codes = tuple(sorted({int(v) for v in retry_on if str(v).isdigit()}))
        return cls(attempts, per_try_timeout_s, conditions, codes)

    def envoy_headers(self) -> tuple[tuple[str, str], ...]:
        """The request headers that give Envoy's router this policy for one request."""
        conditions = list(self.retry_on) + (["retriable-status-codes"] if self.status_codes else [])
        headers = [("x-envoy-max-retries", str(self.attempts)),
                   ("x-envoy-retry-on", ",".join(conditions) or "retriable-status-codes")]
        if self.status_codes:
            headers.append(("x-envoy-retriable-status-codes", ",".join(map(str, self.status_codes))))
        if self.per_try_timeout_s is not None:
            headers.append(("x-envoy-upstream-rq-per-try-timeout-ms", str(int(self.per_try_timeout_s * 1000))))
        return tuple(headers)

    def describe(self) -> str:
        retry_on = [*self.retry_on, *map(str, self.status_codes)]
        ttfb = f"{self.per_try_timeout_s:g}s" if self.per_try_timeout_s is not None else "none"
        return f"attempts={self.attempts} perTryTimeout={ttfb} retryOn={','.join(retry_on) or '-'}"


@dataclass(frozen=True, slots=True)
class Failover:
    """A rule's failover: its policy and, per weighted pick, the full attempt order."""

    policy: RetryPolicy
    orders: tuple[tuple[Target, ...], ...]  # by index of the weighted pick
    # the ext_proc's prebuilt headers per (pick, providers cooling down): see extproc.server
    cache: dict = field(default_factory=dict, compare=False, hash=False, repr=False)


def build_failover(targets: tuple[Target, ...], weights: tuple[int, ...], fallbacks: tuple[Target, ...],
                   policy: RetryPolicy) -> Failover:
    """Every attempt of such a rule, the first included, goes to its provider's failover cluster:
    the one with the retry rewrite (see `extproc.names.failover_cluster`)."""
    def on_failover_cluster(t: Target) -> Target:
        return replace(t, cluster=failover_cluster(t.provider_host))

    targets, fallbacks = tuple(map(on_failover_cluster, targets)), tuple(map(on_failover_cluster, fallbacks))
    return Failover(policy, tuple(full_order(i, targets, weights, fallbacks) for i in range(len(targets))))


def full_order(picked: int, targets: tuple[Target, ...], weights: tuple[int, ...],
               fallbacks: tuple[Target, ...]) -> tuple[Target, ...]:
    """The pick, the other backendRefs by weight (highest first, ties in written order; weight 0
    last), then the fallbacks in order; a provider named twice is tried once, where it comes first."""
    others = sorted((i for i in range(len(targets)) if i != picked), key=lambda i: -weights[i])
    seen: set[str] = set()
    order: list[Target] = []
    for target in (targets[picked], *(targets[i] for i in others), *fallbacks):
        if target.provider_host not in seen:
            seen.add(target.provider_host)
            order.append(target)
    return tuple(order)


def attempt_order(failover: Failover, picked: int, cooling: Mapping[str, float] | frozenset[str] | set[str]) -> tuple[Target, ...]:
    """The providers this request tries, in order: cooling ones left out, unless all are
    cooling (then the pick alone), and no more than 1 + attempts."""
    order = failover.orders[picked]
    if cooling:
        healthy = tuple(t for t in order if t.provider_host not in cooling)
        order = healthy or order[:1]
    return order[: 1 + failover.policy.attempts]


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


def describe_failover(rule) -> str:
    """For `extproc route`: the retry policy and the attempt order after each weighted pick."""
    failover = rule.failover
    if failover is None:
        return "retries: none (a failed attempt's answer reaches the client)"
    lines = [f"retries: {failover.policy.describe()}"]
    for i, target in enumerate(rule.targets):
        order = attempt_order(failover, i, frozenset())
        lines.append(f"  attempt order when {target.provider_host} is picked: "
                     + " -> ".join(t.provider_host for t in order))
    lines.append("  (providers cooling down are skipped; all cooling: the pick is tried anyway)")
    return "\n".join(lines)
