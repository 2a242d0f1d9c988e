"""The routing table: the contract between the config (which compiles it) and the data plane
(which decides every request over it), as Envoy AI Gateway's filterapi is for its processor.

Plain, immutable data, built once per config (see `extproc.config.compile`): a request only
looks its host up in a dict, walks the rules of one route and draws one random number.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from ..protocol import retry_cluster
from .budgets import EMPTY_BUDGETS, BudgetTable
from .caller import Labels
from .capacity import ConnectionLimits
from .data_protection.policy import EMPTY_PROTECTION, ProtectionTable
from .matching import Matches, matches_any
from .pricing import EMPTY_PRICES, Price, PriceTable

# Client base paths every route accepts, besides its providers' own: `/v1/...` and `/...`.
DEFAULT_BASES = frozenset({"/v1", ""})

# The API a provider speaks (see `extproc.policy.provider_api`); what its bodies look like
# (Azure OpenAI's are OpenAI's).
OPENAI_API = "openai"
_BODY_APIS = {"azure": OPENAI_API}


@dataclass(frozen=True, slots=True)
class ApiSettings:
    """What a provider's API needs besides its model and key (each field for one API; see
    `extproc.policy.provider_api`)."""

    anthropic_version: str = "2023-06-01"  # anthropic: the `anthropic-version` header
    max_tokens: int = 4096  # anthropic: max_tokens where the client's request sets none
    api_version: str = ""  # gemini: the path's version (v1beta); azure: the `api-version` query
    deployment: str = ""  # azure: the chat (and completions) deployment
    embedding_deployment: str | None = None  # azure: the embeddings deployment
    region: str = ""  # bedrock: the AWS region requests are signed for
    access_key_id: str = field(default="", repr=False)  # bedrock: the signing key pair
    secret_access_key: str = field(default="", repr=False)
    session_token: str | None = field(default=None, repr=False)


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
    base_path: str | None = None  # the provider's OpenAI base path (see `extproc.policy.openai_api`)
    embedding_model: str | None = None  # replaces the client's model on embeddings
    pool: str | None = None  # a pool of model servers (its host, a key of `RoutingTable.pools`); None: a provider
    # the provider's prices by model (its LLMPriceTable; see `extproc.policy.pricing`), empty when none
    prices: Mapping[str, Price] = field(default_factory=dict, compare=False, hash=False, repr=False)
    api: str = OPENAI_API  # the API the provider speaks: openai, azure, anthropic, gemini, bedrock
    api_settings: ApiSettings | None = None  # what else that API needs (None: its defaults)
    # what the provider's bodies and answers look like: `api`, but Azure OpenAI's are OpenAI's
    body_api: str = field(default=OPENAI_API, init=False)
    # what the ext_proc answers every request to this target with, per endpoint, built once
    # (`extproc.dataplane.answers`): kept here because hashing a target's fields per lookup costs more
    answers: dict[object, tuple[bytes, bytes]] = field(default_factory=dict, init=False, compare=False, hash=False,
                                                       repr=False)

    def __post_init__(self) -> None:
        if self.api != OPENAI_API:
            object.__setattr__(self, "body_api", _BODY_APIS.get(self.api, self.api))


@dataclass(frozen=True, slots=True)
class Pool:
    """A pool of in-cluster model servers a route sends to (a Service or an InferencePool; see
    docs/in-cluster-models.md): its ready endpoints now, and how Envoy speaks to them. The
    endpoint of each request is picked by load (`extproc.policy.endpoint_picker`)."""

    host: str  # <name>.<namespace>.svc (Service) or <name>.<namespace>.inferencepool: its cluster's name
    kind: str  # Service or InferencePool
    name: str  # namespace/name
    protocol: str  # http (HTTP/1.1), h2c, or https
    endpoints: tuple[str, ...]  # "ip:port" of each ready endpoint, sorted


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """A rule's `retries`: how many further attempts, on what, and the time to a first byte."""

    attempts: int  # further attempts after the first
    per_try_timeout_s: float | None  # time to the first byte of one attempt's answer
    retry_on: tuple[str, ...]  # Envoy retry conditions: connect-failure, reset, 5xx, ...
    status_codes: tuple[int, ...]  # retried status codes (429, 503, ...)

    @classmethod
    def from_config(cls, attempts: int, per_try_timeout_s: float | None, retry_on: Iterable[str | int]) -> RetryPolicy:
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
    # the APIs its providers' bodies are in (extproc.policy.provider_api): more than OpenAI's, and
    # each attempt's body is translated for its provider (extproc.policy.answer_format.per_attempt)
    body_apis: frozenset[str] = frozenset({OPENAI_API})
    # the first attempt per (pick, providers cooling down), worked out once (extproc.policy.failover)
    cache: dict[tuple[int, tuple[str, ...] | frozenset[str]], tuple[Target, tuple[tuple[str, str], ...]]] = field(
        default_factory=dict, compare=False, hash=False, repr=False)


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    matches: Matches  # OR of ANDs; empty means "matches everything"
    targets: tuple[Target, ...]
    cumulative_weights: tuple[int, ...]  # running sums of the targets' weights
    failover: Failover | None = None  # `retries` set: attempt orders and policy (extproc.policy.failover)
    # per entry of `matches`, its `sourceLabels` (None: none); empty when no entry has any. A rule
    # is decided over only once specialized for a caller's labels (`extproc.policy.caller_view`)
    sources: tuple[Labels | None, ...] = ()

    def applies(self, headers: Mapping[str, str]) -> bool:
        return matches_any(self.matches, headers)

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
    # namespaces whose workloads may use it; None: all (see extproc.policy.visibility)
    visible: frozenset[str] | None = None
    bases: frozenset[str] = DEFAULT_BASES  # the client base paths it accepts (see `extproc.policy.openai_api`)
    namespace: str = ""  # the object's namespace (a workloadSelector applies there)
    selector: Labels | None = None  # `spec.workloadSelector`: the proxies (by their pod's labels) it applies to
    provider_default: bool = False  # a provider's own host, routed with its default config

    @property
    def label_dependent(self) -> bool:
        """Whether who may use it, or which rule a request gets, depends on the caller's labels."""
        return self.selector is not None or any(rule.sources for rule in self.rules)

    def select(self, headers: Mapping[str, str]) -> Rule | None:
        """The first rule whose matches hold."""
        for rule in self.rules:
            if rule.applies(headers):
                return rule
        return None


@dataclass(frozen=True, slots=True)
class Claim:
    """A route's claim on a host name: its host as written (`qualified` False: it resolves in the
    caller's namespace first), or the host with its namespace (`svc.ns`, `svc.ns.svc`, ...)."""

    route: Route
    qualified: bool


@dataclass(frozen=True, slots=True)
class Forward:
    """A host this proxy does not decide: its plain HTTP goes to an egress gateway (see
    `extproc.policy.gateway_binding`)."""

    gateway: str  # "namespace/name"
    cluster: str  # the sidecars' cluster for the gateway's Service
    address: str  # "host:port" of the gateway's Service


@dataclass(frozen=True)
class RoutingTable:
    routes: Mapping[str, Route]  # by every host name the route answers to (lower case, no port)
    clusters: Mapping[str, str]  # provider host -> cluster name, for xDS
    version: str = "0"
    forwarded: Mapping[str, Forward] = field(default_factory=dict)  # host -> egress gateway (mesh view)
    budgets: BudgetTable = EMPTY_BUDGETS  # LLMTokenRateLimit objects by route name
    health: Mapping[str, tuple[int, float]] = field(default_factory=dict)  # host -> passive-health thresholds
    failover_clusters: Mapping[str, str] = field(default_factory=dict)  # provider host -> its failover cluster
    # Names several routes answer to (a short host in several namespaces, a provider's host an
    # LLMRoute takes over): which one a caller gets depends on its namespace and on what it may
    # use (`extproc.policy.caller_view`). `routes` holds the one a caller of no namespace gets.
    claims: Mapping[str, tuple[Claim, ...]] = field(default_factory=dict)
    home: str | None = None  # the control plane's namespace, whose objects are everyone's by default
    # per caller (namespace, labels): the routes it sees, worked out once per table
    views: dict[object, object] = field(default_factory=dict, compare=False, hash=False, repr=False)
    prices: PriceTable = EMPTY_PRICES  # LLMPriceTable objects: per provider host, per model
    protection: ProtectionTable = EMPTY_PROTECTION  # LLMDataPolicy guards by route name and caller namespace
    # provider hosts whose name does not resolve now (extproc.policy.addresses): failover leaves
    # them out of attempt orders, as providers cooling down. Set by the control plane, not the config.
    unresolved: frozenset[str] = frozenset()
    # provider host -> the requests in flight its clusters admit, where its spec.connectionPool
    # changes the defaults (extproc.policy.capacity)
    capacity: Mapping[str, ConnectionLimits] = field(default_factory=dict)
    # pools of in-cluster model servers by host (`Pool`): endpoints change without a config change
    pools: Mapping[str, Pool] = field(default_factory=dict)

    @cached_property  # once per table (not a dataclass field: no part of equality)
    def cluster_hosts(self) -> dict[str, str]:
        """Every provider cluster (plain and failover) -> its provider host."""
        found = {cluster: host for clusters in (self.clusters, self.failover_clusters)
                 for host, cluster in clusters.items()}
        found.update((retry_cluster(host), host) for host in self.failover_clusters if host in self.pools)
        return found

    @cached_property
    def empty_pools(self) -> frozenset[str]:
        """Pools with no ready endpoint now: failover skips them, as names that do not resolve."""
        return frozenset(host for host, pool in self.pools.items() if not pool.endpoints)

    @cached_property
    def host_names(self) -> frozenset[str]:
        """Every name some caller may send a request for: the sidecars' LLM host names (RDS)."""
        return frozenset(self.routes) | frozenset(self.claims)

    @cached_property
    def all_routes(self) -> tuple[Route, ...]:
        """Each route once, whatever names it answers to."""
        found: dict[int, Route] = {}
        for route in self.routes.values():
            found.setdefault(id(route), route)
        for claims in self.claims.values():
            for claim in claims:
                found.setdefault(id(claim.route), claim.route)
        return tuple(found.values())

    @cached_property
    def retry_targets(self) -> dict[tuple[str, str], dict[str, Target]]:
        """(route, rule) -> cluster -> the target that rule gives that provider: a retried
        attempt's provider, found from the cluster its attempt order names."""
        index: dict[tuple[str, str], dict[str, Target]] = {}
        for route in self.all_routes:
            for rule in route.rules:
                if rule.failover is None:
                    continue
                by_cluster = index.setdefault((route.name, rule.name), {})
                for order in rule.failover.orders:
                    for target in order:
                        by_cluster.setdefault(target.cluster, target)
        return index

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


class TableHolder:
    """The routing table in force. Replaced whole on a config change; a request keeps the table
    it started with, so a change never fails a request in flight."""

    def __init__(self, table: RoutingTable):
        self.table = table
