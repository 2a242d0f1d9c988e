"""Routing decisions: which route, which rule, which provider. Pure functions on plain data.

The routing table is built once per config (see `extproc.config.compile`); a request only
looks its host up in a dict, walks the rules of one route and draws one random number.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Literal, Mapping

if TYPE_CHECKING:
    from .failover import Failover

MatchKind = Literal["exact", "prefix", "regex", "present"]
# Client base paths every route accepts, besides its providers' own: `/v1/...` and `/...`.
DEFAULT_BASES = frozenset({"/v1", ""})


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """One header test, with Istio StringMatch semantics (regex must match the whole value)."""

    name: str  # lower case
    kind: MatchKind
    value: str = ""
    pattern: re.Pattern[str] | None = field(default=None, compare=False)

    def holds(self, headers: Mapping[str, str]) -> bool:
        actual = headers.get(self.name)
        if actual is None:
            return False
        if self.kind == "exact":
            return actual == self.value
        if self.kind == "prefix":
            return actual.startswith(self.value)
        if self.kind == "regex":
            assert self.pattern is not None
            return self.pattern.fullmatch(actual) is not None
        return True


@dataclass(frozen=True, slots=True)
class Target:
    """Everything a request needs once a provider is chosen: where it goes and how it is rewritten."""

    route: str  # "namespace/name" of the LLMRoute, or of the LLMProvider when no route names its host
    rule: str  # the rule's name, or "rules[i]" for an unnamed rule
    provider: str  # "namespace/name" of the LLMProvider
    provider_host: str
    cluster: str
    path: str
    model: str | None
    stream: bool | None
    api_key: str | None = field(default=None, repr=False)
    timeout_s: float | None = None  # the whole answer, streamed ones included; None: no total bound
    base_path: str | None = None  # the provider's OpenAI base path (see `extproc.endpoints`)
    embedding_model: str | None = None  # replaces the client's model on embeddings
    # what the ext_proc answers every request to this target with, per endpoint, built once
    # (`extproc.server`): kept here because hashing a target's fields per lookup costs more
    answers: dict = field(default_factory=dict, init=False, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    matches: tuple[tuple[HeaderCondition, ...], ...]  # OR of ANDs; empty means "matches everything"
    targets: tuple[Target, ...]
    cumulative_weights: tuple[int, ...]  # running sums of the targets' weights
    failover: "Failover | None" = None  # `retries` set: attempt orders and policy (extproc.failover)

    def applies(self, headers: Mapping[str, str]) -> bool:
        if not self.matches:
            return True
        return any(all(cond.holds(headers) for cond in conds) for conds in self.matches)

    def pick(self, draw: float) -> Target:
        """The target for a uniform draw in [0, 1): each target's share is its weight's share."""
        return self.targets[self.pick_index(draw)]

    def pick_index(self, draw: float) -> int:
        if len(self.targets) == 1:
            return 0
        return bisect.bisect_right(self.cumulative_weights, draw * self.cumulative_weights[-1])


@dataclass(frozen=True, slots=True)
class Route:
    name: str  # "namespace/name"
    rules: tuple[Rule, ...]
    match_headers: frozenset[str]  # the lower-case header names any rule looks at
    visible: frozenset[str] | None = None  # namespaces whose workloads may use it; None: all (see extproc.auth)
    bases: frozenset[str] = DEFAULT_BASES  # the client base paths it accepts (see `extproc.endpoints`)

    def select(self, headers: Mapping[str, str]) -> Rule | None:
        """The first rule whose matches hold."""
        for rule in self.rules:
            if rule.applies(headers):
                return rule
        return None


@dataclass(frozen=True, slots=True)
class Forward:
    """A host this proxy does not decide: its plain HTTP goes to an egress gateway (see `gateways`)."""

    gateway: str  # "namespace/name"
    cluster: str  # the sidecars' cluster for the gateway's Service
    address: str  # "host:port" of the gateway's Service


@dataclass(frozen=True)
class RoutingTable:
    routes: Mapping[str, Route]  # by every host name the route answers to (lower case, no port)
    clusters: Mapping[str, str]  # provider host -> cluster name, for xDS
    version: str = "0"
    forwarded: Mapping[str, Forward] = field(default_factory=dict)  # host -> egress gateway (mesh view)
    budgets: object = None  # extproc.budgets.BudgetTable: LLMTokenRateLimit objects by route name
    health: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # host -> passive-health thresholds
    failover_clusters: Mapping[str, str] = field(default_factory=dict)  # provider host -> its failover cluster

    @cached_property  # once per table (not a dataclass field: no part of equality)
    def cluster_hosts(self) -> dict[str, str]:
        """Every provider cluster (plain and failover) -> its provider host."""
        return {cluster: host for clusters in (self.clusters, self.failover_clusters) for host, cluster in clusters.items()}

    def route_for(self, authority: str) -> Route | None:
        # routes are keyed by normalized names: an exact hit needs no normalizing (the usual case)
        route = self.routes.get(authority)
        return route if route is not None else self.routes.get(normalize_host(authority))


EMPTY_TABLE = RoutingTable(routes={}, clusters={})


def normalize_host(authority: str) -> str:
    """Host as routes are keyed: lower case, without port, without a trailing dot."""
    host = authority
    if host.startswith("["):  # IPv6 literal
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    else:
        colon = host.rfind(":")
        if colon != -1 and host[colon + 1 :].isdigit():
            host = host[:colon]
    return host.rstrip(".").lower()


def host_aliases(host: str, namespace: str) -> list[str]:
    """The names an object's host answers to, as names resolve inside a Kubernetes namespace."""
    return [host, f"{host}.{namespace}", f"{host}.{namespace}.svc", f"{host}.{namespace}.svc.cluster.local"]


def decide(table: RoutingTable, authority: str, headers: Mapping[str, str], draw: float) -> Target | None:
    """Route, rule and provider for a request, or None when nothing serves it."""
    route = table.route_for(authority)
    if route is None:
        return None
    rule = route.select(headers)
    if rule is None:
        return None
    return rule.pick(draw)
