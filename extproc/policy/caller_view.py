"""What one caller sees of the routing table: the routes it may be decided by, under the names
it may use, specialized for its labels.

Worked out once per (routing table, caller's namespace and labels) and kept on the caller
(`Caller.memo`) and on the table (`RoutingTable.views`), so a request costs what it did before
identity mattered: one dictionary lookup for its host, and the header matching of one route.
For a caller the view holds:

- **names resolved in its namespace**: a short host (`svc`) is the route of the caller's own
  namespace where there is one, else the control plane's namespace's, else the only one the
  caller sees (`svc.ns` and the longer forms always name namespace `ns`'s);
- **only what it may use**: `spec.exportTo` (`extproc.policy.visibility`) and
  `spec.workloadSelector` (in the object's own namespace, the proxies whose pod's labels
  include the selector's, as Istio reads it; elsewhere nobody);
- **rules specialized for its labels**: a `matches` entry with `sourceLabels` the caller's
  labels do not include is left out (a rule left with no entry never matches), and the ones it
  does include keep only their header conditions.

A caller whose labels are not known (its pod not seen yet, gone, or the API server out of
reach for too long: `extproc.dataplane.workload_identity`) must never get another caller's
routes: a route whose decision depends on labels (a workloadSelector in its namespace, a rule
with sourceLabels) answers it 503 `caller_unresolved` instead; everything else it is decided as
usual.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

from ..errors import GatewayError
from .caller import NO_LABELS, Caller, Labels, selects
from .gateway_binding import refusal
from .table import Claim, Route, RoutingTable, Rule, normalize_host
from .visibility import may_use

MAX_VIEWS = 4096  # per table: distinct (namespace, labels) of callers; past it the cache starts again

UNRESOLVED_CODE = "caller_unresolved"


@dataclass(frozen=True, slots=True)
class CallerView:
    """The routes one caller sees, by every name it may use, and the names it may not be decided
    for while its labels are unknown (with the 503 they answer)."""

    routes: Mapping[str, Route]
    unresolved: Mapping[str, Route]
    namespace: str | None = None
    labels: Labels | None = NO_LABELS

    def resolve(self, table: RoutingTable, authority: str) -> Route:
        """The route for `authority`, or the error that says why none (the slow path)."""
        host = normalize_host(authority)
        route = self.routes.get(host)
        if route is not None:
            return route
        if host in self.unresolved:
            raise unresolved(self.unresolved[host].name)
        usable = sorted({c.route.namespace for c in table.claims.get(host, ()) if not c.qualified
                         and not c.route.provider_default
                         and for_caller(c.route, self.namespace, self.labels) is not None})
        if len(usable) > 1:  # only namespaces whose routes this caller may use: nothing else is revealed
            raise GatewayError(404, f"host {host!r} is routed in several namespaces ({', '.join(usable)}): name one, "
                                    f"as {host}.{usable[0]}", "unknown_host")
        raise refusal(table, authority) or GatewayError(
            404, f"no LLMRoute or LLMProvider serves host {authority!r}", "unknown_host")


def unresolved(route: str) -> GatewayError:
    return GatewayError(503, f"the caller's workload labels are not known right now, and route {route} depends on "
                             "them: try again shortly", UNRESOLVED_CODE, "server_error")


def view_of(table: RoutingTable, caller: Caller) -> CallerView:
    """The caller's view of `table`: kept on the caller for this table, else on the table for
    its (namespace, labels), else worked out."""
    memo = caller.memo
    kept = memo.get("view")
    if kept is not None and kept[0] is table:
        view: CallerView = kept[1]
        return view
    key = (caller.namespace, caller.labels)
    found = table.views.get(key)
    if not isinstance(found, CallerView):
        found = build_view(table, caller.namespace, caller.labels)
        if len(table.views) >= MAX_VIEWS:
            table.views.clear()
        table.views[key] = found
    memo["view"] = (table, found)
    return found


def build_view(table: RoutingTable, namespace: str | None, labels: Labels | None) -> CallerView:
    """The view of a caller in `namespace` (None: local mode, every namespace) with `labels`
    (None: unknown)."""
    if namespace is None and not table.claims and not any(r.label_dependent for r in table.all_routes):
        return CallerView(table.routes, {}, namespace, labels)  # local mode, nothing depends on the caller
    specialized: dict[int, Route | None] = {}  # by the route's id: the caller's version, None if it may not use it

    def seen(route: Route) -> Route | None:
        key = id(route)
        if key not in specialized:
            specialized[key] = for_caller(route, namespace, labels)
        return specialized[key]

    routes: dict[str, Route] = {}
    pending: dict[str, Route] = {}

    def place(name: str, route: Route | None) -> None:
        mine = seen(route) if route is not None else None
        if mine is UNRESOLVED_ROUTE:
            assert route is not None
            pending[name] = route
        elif mine is not None:
            routes[name] = mine

    for name, route in table.routes.items():
        if name not in table.claims:
            place(name, route)
    for name, claims in table.claims.items():
        place(name, pick(claims, namespace, table.home, lambda r: seen(r) is not None))
    return CallerView(routes, pending, namespace, labels)


def pick(claims: tuple[Claim, ...], namespace: str | None, home: str | None,
         usable: Callable[[Route], bool] = lambda _route: True) -> Route | None:
    """Which of several routes claiming one name a caller in `namespace` gets, among those it may
    use. LLMRoutes before providers' own hosts (an LLMRoute on a provider's host takes it over).
    Among LLMRoutes: the caller's own namespace's host, else the name's namespace (`svc.ns`),
    else the control plane's namespace's host, else the only one; None when several remain (the
    caller must name the namespace: `svc.ns`). Among providers (whose hosts are unique): the one
    whose host it is, else the one whose host and namespace it is."""
    for defaults in (False, True):
        group = [c for c in claims if c.route.provider_default is defaults and usable(c.route)]
        if not group:
            continue
        if defaults:
            return next((c for c in group if not c.qualified), group[0]).route
        if namespace is not None:
            own = next((c for c in group if not c.qualified and c.route.namespace == namespace), None)
            if own is not None:
                return own.route
        qualified = next((c for c in group if c.qualified), None)
        if qualified is not None:
            return qualified.route
        if home is not None:
            shared = next((c for c in group if c.route.namespace == home), None)
            if shared is not None:
                return shared.route
        return group[0].route if len(group) == 1 else None
    return None


UNRESOLVED_ROUTE = Route("", (), frozenset())  # a marker: the caller may see it only once its labels are known


def for_caller(route: Route, namespace: str | None, labels: Labels | None) -> Route | None:
    """The route as this caller is decided by it (its rules specialized for the labels), None
    when the caller may not use it, or `UNRESOLVED_ROUTE` while its labels are unknown and matter."""
    if not may_use(namespace, route.visible):
        return None
    if route.selector is not None:
        if namespace is not None and namespace != route.namespace:
            return None  # a workloadSelector applies in the object's own namespace only
        if labels is None:
            return UNRESOLVED_ROUTE
        if not selects(route.selector, labels):
            return None
    if not any(rule.sources for rule in route.rules):
        return route
    if labels is None:
        return UNRESOLVED_ROUTE
    rules = tuple(r for r in (specialize(rule, labels) for rule in route.rules) if r is not None)
    return replace(route, rules=rules)


def specialize(rule: Rule, labels: Labels) -> Rule | None:
    """The rule for a caller with `labels`: entries whose sourceLabels hold, with their header
    conditions only; None when no entry holds (the rule never matches this caller)."""
    if not rule.sources:
        return rule
    kept = tuple(conds for conds, source in zip(rule.matches, rule.sources, strict=True)
                 if source is None or selects(source, labels))
    if not kept:
        return None
    return replace(rule, matches=kept, sources=())


def explain(route: Route, rule_name: str, headers: Mapping[str, str], labels: Labels | None) -> str:
    """Why a rule matched, in one line (for `extproc route`): the first of its `matches` entries
    that holds for these headers and labels."""
    rule = next((r for r in route.rules if r.name == rule_name), None)
    if rule is None:
        return ""
    if not rule.matches:
        return "it has no matches: every request"
    for i, conds in enumerate(rule.matches):
        source = rule.sources[i] if rule.sources else None
        if source is not None and (labels is None or not selects(source, labels)):
            continue
        if not all(cond.holds(headers) for cond in conds):
            continue
        text = [f"header {c.name} {c.kind}" + ("" if c.kind == "present" else f" {c.value!r}") for c in conds]
        if source is not None:
            text.append("sourceLabels " + ",".join(f"{k}={v}" for k, v in sorted(source)))
        return f"matches[{i}]: " + (" and ".join(text) or "everything")
    return ""
