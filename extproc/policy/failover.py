"""Failover across providers: pure decisions (docs/failover.md).

- the attempt order of a request: the weighted pick, the rule's other backendRefs by weight
  (highest first), then its fallbackRefs; no provider twice; providers cooling down, and those
  whose name does not resolve, left out (all of them: the pick alone, tried anyway); at most
  1 + attempts long;
- the retry policy as the request headers Envoy's router reads;
- a retried attempt's provider, from the order the request carries.

Passive health (who is cooling down) is `extproc.policy.passive_health`. Envoy does the
retrying; these decide what it is told.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import replace

from ..errors import GatewayError
from ..protocol import NO_PROVIDER_CLUSTER, ORDER_HEADER, failover_cluster, next_header, retry_cluster
from .table import Failover, RetryPolicy, RoutingTable, Rule, Target

# Larger request bodies are sent without failover (one attempt, as without `retries`): Envoy 1.40
# does not retry them, or crashes in the retried attempt's upstream filters (seen end to end).
FAILOVER_BODY_MAX = 1_000_000


def build_failover(targets: tuple[Target, ...], weights: tuple[int, ...], fallbacks: tuple[Target, ...],
                   policy: RetryPolicy) -> Failover:
    """Every attempt of such a rule, the first included, goes to its provider's failover cluster:
    the one with the retry rewrite (see `extproc.protocol.failover_cluster`)."""
    def on_failover_cluster(t: Target) -> Target:
        return replace(t, cluster=failover_cluster(t.provider_host))

    targets, fallbacks = tuple(map(on_failover_cluster, targets)), tuple(map(on_failover_cluster, fallbacks))
    return Failover(policy, tuple(full_order(i, targets, weights, fallbacks) for i in range(len(targets))),
                    frozenset(t.body_api for t in (*targets, *fallbacks)))


def full_order(picked: int, targets: tuple[Target, ...], weights: tuple[int, ...],
               fallbacks: tuple[Target, ...]) -> tuple[Target, ...]:
    """The pick, the other backendRefs by weight (highest first, ties in written order; weight 0
    last), then the fallbacks in order; a provider named twice is tried once, where it comes first.
    A pool of model servers is tried twice in a row: its best endpoint, then another (its retry cluster)."""
    others = sorted((i for i in range(len(targets)) if i != picked), key=lambda i: -weights[i])
    seen: set[str] = set()
    order: list[Target] = []
    for target in (targets[picked], *(targets[i] for i in others), *fallbacks):
        if target.provider_host not in seen:
            seen.add(target.provider_host)
            order.append(target)
            if target.pool is not None:  # a pool of model servers: then its next-best endpoint
                order.append(replace(target, cluster=retry_cluster(target.provider_host)))
    return tuple(order)


def attempt_order(failover: Failover, picked: int, cooling: Mapping[str, float] | Set[str]) -> tuple[Target, ...]:
    """The providers this request tries, in order: cooling ones left out, unless all are
    cooling (then the pick alone), and no more than 1 + attempts."""
    order = failover.orders[picked]
    if cooling:
        healthy = tuple(t for t in order if t.provider_host not in cooling)
        order = healthy or order[:1]
    return order[: 1 + failover.policy.attempts]


def first_attempt(failover: Failover, picked: int, cooling: Mapping[str, float] | Set[str]
                  ) -> tuple[Target, tuple[tuple[str, str], ...]]:
    """The first target of a request with retries and its headers (attempt order, retry policy),
    worked out once per weighted pick and set of providers cooling down, and kept on the rule."""
    # the table's own set of unresolved providers is the same object request after request: a
    # key as it is (its hash is kept); a cooling-down dict is new each time: its sorted hosts
    key = (picked, cooling if isinstance(cooling, frozenset) else tuple(sorted(cooling)) if cooling else ())
    cached = failover.cache.get(key)
    if cached is None:
        order = attempt_order(failover, picked, cooling)
        if len(failover.cache) > 256:  # cool-down states come and go
            failover.cache.clear()
        cached = failover.cache[key] = (order[0], order_headers(order, failover.policy))
    return cached


def order_headers(order: tuple[Target, ...], policy: RetryPolicy) -> tuple[tuple[str, str], ...]:
    """The headers a request with retries carries: its attempt order (cluster names, which
    Envoy's failover route reads per attempt) and the retry policy for Envoy's router."""
    clusters = [t.cluster for t in order]
    nexts = [(next_header(c), after) for c, after in zip(clusters, [*clusters[1:], NO_PROVIDER_CLUSTER], strict=True)]
    return ((ORDER_HEADER, ",".join(clusters)), *nexts, *policy.envoy_headers())


def retry_target(table: RoutingTable, route: str, rule: str, order: str, attempt: int, first: bool = False) -> Target:
    """The target of attempt `attempt` (2 or more; 1 too with `first`, where every attempt is
    rewritten here: extproc.policy.answer_format.per_attempt) of a request of `route`/`rule`."""
    clusters = order.split(",") if order else []
    if not (1 if first else 2) <= attempt <= len(clusters):
        raise GatewayError(500, "the gateway could not prepare a retry", "retry_error")
    target = table.retry_targets.get((route, rule), {}).get(clusters[attempt - 1])
    if target is None:  # the config changed under the request: its rule no longer names it
        raise GatewayError(503, "the provider of this retry is no longer configured", "retry_provider_gone",
                           "server_error")
    return target


def attempt_target(table: RoutingTable, route: str, rule: str, host: str) -> Target | None:
    """The target a rule with `retries` gives a provider host: what a failed attempt there was
    (its provider, model and prices), for the spend of attempts nobody metered."""
    for target in table.retry_targets.get((route, rule), {}).values():
        if target.provider_host == host:
            return target
    return None


def tried_before(table: RoutingTable, route: str, rule: str, order: str, attempt: int) -> str:
    """The provider hosts of the attempts before `attempt`, comma-separated (the access log's `tried`)."""
    by_cluster = table.retry_targets.get((route, rule), {})
    return ",".join(by_cluster[c].provider_host if c in by_cluster else c for c in order.split(",")[: attempt - 1])


def describe_failover(rule: Rule) -> str:
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
