"""Where a request is decided: the one decision function, over the routing table.

`decide` takes the table in force, the request's headers (as Envoy sends them: names in lower
case, values as bytes), whether a body follows, the verified caller, a uniform random draw and
the providers cooling down, and returns a `Decision` (where the request goes, and what Envoy
must be told) or a `ModelList` (the gateway answers itself), or raises `GatewayError` (the
request is answered with an OpenAI-style error). No I/O and no state: the ext_proc calls it once
per request, `extproc route` explains a request with `match`, and both are table-tested.

The caller decides what it sees: its namespace's names, what it may use, the rules its labels
select (`extproc.policy.caller_view`, worked out once per caller and table).

The body is not read here: every decision of today's config is taken from the headers, so that
it can be taken before the body arrives (budgets and body memory admit a request at its
headers). The body is checked and rewritten for the decision's target by
`extproc.dataplane.body_rewrite`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Set
from dataclasses import dataclass

from ..errors import GatewayError
from ..protocol import INTERNAL_HEADER_PREFIX
from . import openai_api
from .caller import LOCAL, Caller
from .caller_view import explain, view_of
from .data_protection.policy import Guard
from .endpoint_picker import Ranking, prefix_hashes
from .endpoint_state import EndpointState
from .failover import first_attempt
from .openai_api import Endpoint
from .table import Pool, Route, RoutingTable, Rule, Target

# What a client may not set: Envoy's own request headers (timeouts, retries, the attempt count)
# and the gateway's internal ones (the cluster, the attempt order). They are removed before the
# request reaches Envoy's router, or overwritten where the gateway sets them itself.
CLIENT_MUST_NOT_SET = ("x-envoy-", INTERNAL_HEADER_PREFIX)

NO_ATTEMPT_HEADERS: tuple[tuple[str, str], ...] = ()


@dataclass(slots=True)  # not frozen: one is built per request, and a frozen one costs more to build
class Decision:
    """Where a request goes, and what Envoy must be told to send it there."""

    route: Route
    rule: Rule
    target: Target  # the provider of the first attempt
    endpoint: Endpoint  # which OpenAI endpoint the request calls
    authority: str  # the host the client sent (access log, metrics)
    headers: dict[str, bytes]  # the request's headers by name, read once (for budgets)
    strip: list[str]  # client headers that must not reach Envoy's router or the provider
    attempt_headers: tuple[tuple[str, str], ...]  # a rule with retries: attempt order and retry policy
    declared_length: int | None  # the body's content-length, where the client declared one
    guard: Guard | None = None  # the LLMDataPolicy rules its prompt is checked against (extproc.policy.data_protection)
    # pools of model servers: per pool cluster of its attempts, the endpoint picked, once the body
    # is whole (`pick_endpoints`: the prompt's prefix and model count)
    endpoints: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ModelList:
    """`GET .../models`: answered by the gateway itself, from the route's config."""

    route: Route
    authority: str


def route_for(table: RoutingTable, authority: str, caller: Caller) -> Route:
    """The route serving `authority` for this caller, as it sees it (`extproc.policy.caller_view`:
    names resolved in its namespace, only what it may use, rules specialized for its labels). A
    route it may not use is answered as an unknown host; a host an egress gateway decides says
    where; a route that depends on labels the caller's are not known for answers 503."""
    view = view_of(table, caller)
    route = view.routes.get(authority)
    return route if route is not None else view.resolve(table, authority)


def rule_for(route: Route, values: Mapping[str, str]) -> Rule:
    """The route's first rule whose matches hold for these header values."""
    rule = route.select(values)
    if rule is None:
        raise GatewayError(404, f"no rule of route {route.name} matches the request", "no_matching_rule")
    return rule


def match(table: RoutingTable, authority: str, headers: Mapping[str, str],
          caller: Caller = LOCAL) -> tuple[Route, Rule, str]:
    """The route and rule a request gets (for `extproc route`): the same steps as `decide`, and
    why that rule (which of its `matches` held)."""
    route = route_for(table, authority, caller)
    rule = rule_for(route, headers)
    full = next((r for r in table.all_routes  # the route before it was specialized for the caller
                 if r.name == route.name and r.provider_default is route.provider_default), route)
    return route, rule, explain(full, rule.name, headers, caller.labels)


def decide(table: RoutingTable, headers: dict[str, bytes], has_body: bool, caller: Caller, draw: float,
           cooling: Callable[[], Mapping[str, float]]) -> Decision | ModelList:
    """The decision for one request (see the module's docstring). `cooling`: the provider hosts
    cooling down now (`extproc.policy.passive_health`), left out of attempt orders with those
    whose name does not resolve (`table.unresolved`); asked only for a rule with retries."""
    authority = headers.get(":authority", b"").decode("latin-1")
    view = view_of(table, caller)  # kept on the caller: a lookup (extproc.policy.caller_view)
    route = view.routes.get(authority)
    if route is None:
        route = view.resolve(table, authority)  # normalized, or why not
    endpoint = openai_api.recognize(headers.get(":method", b"").decode("latin-1"),
                                    headers.get(":path", b"").decode("latin-1"), route.bases)
    if endpoint is openai_api.MODELS:
        return ModelList(route, authority)
    try:
        if not has_body:
            raise GatewayError(400, f"request body is required: a JSON {endpoint.name} request", "missing_body")
        watched = route.match_headers
        values = {key: headers[key].decode("latin-1") for key in watched if key in headers} if watched else {}
        rule = rule_for(route, values)
    except GatewayError as error:  # answered in the client's API's shape
        error.client_api = endpoint.client_api
        raise
    strip = [key for key in headers if key.startswith(CLIENT_MUST_NOT_SET)]
    length = headers.get("content-length")
    declared = _length(length) if length else None
    protection = table.protection
    guard = protection.guard(route.name, caller.namespace) if protection.by_route else None
    if rule.failover is None:
        target = rule.pick(draw)
        if target.pool is not None and target.pool in table.empty_pools:
            raise no_endpoint(target)
        return Decision(route, rule, target, endpoint, authority, headers, strip, NO_ATTEMPT_HEADERS,
                        declared, guard)
    # a rule with retries: the first provider of the attempt order, and the headers that give
    # Envoy the order and the retry policy (extproc.policy.failover)
    skipped: Mapping[str, float] | Set[str] = cooling()
    if table.unresolved:  # names that do not resolve: Envoy would answer 503 without trying the next
        skipped = table.unresolved.union(skipped) if skipped else table.unresolved
    if table.empty_pools:  # pools with no ready endpoint, likewise
        skipped = table.empty_pools.union(skipped) if skipped else table.empty_pools
    target, attempt_headers = first_attempt(rule.failover, rule.pick_index(draw), skipped)
    if target.pool is not None and target.pool in table.empty_pools:  # every one skipped: the pick, empty
        raise no_endpoint(target)
    return Decision(route, rule, target, endpoint, authority, headers, strip, attempt_headers, declared, guard)


def _length(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:  # Envoy refuses such a request before; never trust it here either
        return 0


def no_endpoint(target: Target) -> GatewayError:
    error = GatewayError(503, f"no model server of {target.provider} is ready", "no_ready_endpoint", "server_error")
    error.headers = (("retry-after", "1"),)
    return error


def endpoint_slots(table: RoutingTable, decision: Decision) -> tuple[tuple[str, Pool, int], ...]:
    """The pool clusters a request's attempts may reach, each with its pool and the rank of the
    endpoint it gets (0: the pool's best; 1: the next, for the pool's retry cluster)."""
    if decision.attempt_headers:
        order = decision.attempt_headers[0][1].split(",")
    else:
        order = [decision.target.cluster]
    hosts = table.cluster_hosts
    found: list[tuple[str, Pool, int]] = []
    seen: dict[str, int] = {}
    for cluster in order:
        pool = table.pools.get(hosts.get(cluster, ""))
        if pool is not None:
            rank = seen[pool.host] = seen.get(pool.host, -1) + 1
            found.append((cluster, pool, rank))
    return tuple(found)


def pick_endpoints(table: RoutingTable, decision: Decision, state: EndpointState, now: float, body: bytes,
                   model: str) -> tuple[tuple[str, str], ...]:
    """The endpoint of each pool cluster the request may reach, picked by load over the state's
    snapshot (`extproc.policy.endpoint_picker`), once its body (the prompt's prefix) and model
    (a LoRA adapter's name) are known; kept on the decision, counted as sent. 503 where a pool
    the first attempt goes to has no ready endpoint."""
    slots = endpoint_slots(table, decision)
    if not slots:
        if decision.target.pool is not None:  # the pool went away with a config change
            raise no_endpoint(decision.target)
        return ()
    hashes = prefix_hashes(body)
    rankings: dict[str, Ranking] = {}
    chosen = []
    for cluster, pool, rank in slots:
        ranking = rankings.get(pool.host)
        if ranking is None:
            ranking = rankings[pool.host] = state.rank(pool, now, hashes, model)
        picked = ranking.endpoint(rank)
        if picked is None:
            if cluster == decision.target.cluster:
                raise no_endpoint(decision.target)
            continue
        chosen.append((cluster, picked))
    first = decision.target.cluster
    for cluster, picked in chosen:
        if cluster == first:
            pool = table.pools[table.cluster_hosts[cluster]]
            state.sent(pool, picked, hashes)
    decision.endpoints = tuple(chosen)
    return decision.endpoints
