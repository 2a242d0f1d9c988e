"""Turn parsed objects into a routing table, checking what spans objects.

Per-object checks live in the models; here are the ones that need the whole set: duplicated
hosts, a providerHost no LLMProvider serves, and the provider configs a rule ends up with.
An object that fails a check is left out (with an error naming it); the rest still compile,
so a caller can choose between "all or nothing" (files) and "skip the bad one" (Kubernetes).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Literal

from ..policy.budgets import Budget, BudgetRule, BudgetTable
from ..policy.caller import Labels, labels_of
from ..policy.caller_view import pick
from ..policy.capacity import DEFAULT_PROVIDER_LIMITS, ConnectionLimits
from ..policy.failover import build_failover
from ..policy.gateway_binding import (
    MESH,
    MESH_VIEW,
    View,
    declared_binding,
    forward_to,
    gateway_ref,
    provider_binding,
    route_binding,
)
from ..policy.matching import HeaderCondition
from ..policy.openai_api import base_path, route_bases
from ..policy.passive_health import DEFAULT_CONSECUTIVE_ERRORS, DEFAULT_COOL_DOWN_S
from ..policy.pricing import PICO_PER_UNIT, Price, PriceTable, price_per_token
from ..policy.provider_api import DEFAULT_GEMINI_API_VERSION
from ..policy.table import (
    ApiSettings,
    Claim,
    Forward,
    Pool,
    RetryPolicy,
    Route,
    RoutingTable,
    Rule,
    Target,
    host_aliases,
    normalize_host,
)
from ..policy.visibility import may_use, visible_to
from ..protocol import RETRY_CLUSTER_PREFIX, provider_cluster
from .backends import ENDPOINTS_ANNOTATION, H2C, Backend, Key, service_port
from .data_policies import compile_protection
from .loader import Loaded
from .models import (
    AnthropicConfig,
    ApiConfig,
    AzureOpenAIConfig,
    BedrockConfig,
    GeminiConfig,
    LLMPriceTable,
    LLMProvider,
    LLMRoute,
    LLMTokenRateLimit,
    ObjectRef,
    OpenAIConfig,
    StringMatch,
    parse_duration,
)
from .problems import Problem


@dataclass(frozen=True)
class Compiled:
    table: RoutingTable
    problems: list[Problem]
    accepted: list[Loaded]  # the objects that made it into the table


def compile_config(objects: list[Loaded], view: View = MESH_VIEW, namespaces: bool = False,
                   home: str | None = None, backends: Mapping[Key, Backend | str] | None = None,
                   endpoints: Mapping[Key, tuple[str, ...]] | None = None) -> Compiled:
    """The routing table for `view` (the mesh, or one egress gateway; see `extproc.policy.gateway_binding`).
    Which objects are accepted does not depend on the view, except that the mesh view also
    refuses an object naming an egress gateway it does not know.

    With `namespaces` (Kubernetes, where each namespace has its own authors), a route may use
    only providers exported to its namespace, and each route records the namespaces whose
    workloads may use it (see `extproc.policy.visibility`; `home` is the control plane's namespace).
    Without (files, which the operator writes), every object may use every other.

    Host names: an object's host as written resolves in the caller's namespace first, and with
    its namespace (`svc.ns`, `svc.ns.svc`, `svc.ns.svc.cluster.local`) from anywhere (see
    `extproc.policy.caller_view`). Two objects conflict only on the same host in the same
    namespace, for the same proxy.

    `backends`: the Services and InferencePools a route's `backendRef` may name
    (`extproc.config.backends`), with their ready `endpoints` (Kubernetes: from EndpointSlices and
    pods; None: each object's endpoints annotation, as in files)."""
    problems: list[Problem] = []
    providers: dict[str, Loaded] = {}
    declared: dict[str, tuple[str, ...]] = {}  # provider host -> its own spec.gateways, where set
    for obj in objects:
        if not isinstance(obj.resource, LLMProvider):
            continue
        spec = obj.resource.spec
        config_problems = _provider_config_problems(obj)
        if config_problems:
            problems.extend(config_problems)
            continue
        if spec.host in providers:
            problems.append(Problem(f"host {spec.host!r} is already served by {providers[spec.host].label}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostConflict"))
            continue
        if spec.gateways is not None:
            check = route_binding(spec.gateways, obj.resource.metadata.namespace, view)
            if check.errors:
                problems.extend(Problem(message, file=obj.file, obj=obj.label, field=path, reason=reason)
                                for path, message, reason in check.errors)
                continue
            declared[spec.host] = declared_binding(spec.gateways, obj.resource.metadata.namespace)
        providers[spec.host] = obj

    prices = compile_prices(objects, providers, problems, home if namespaces else None, namespaces)
    claimed: dict[str, list[Claim]] = {}  # host name -> the routes answering to it here
    forwarded: dict[str, Forward] = {}
    used: set[str] = set()  # provider hosts the routes served here send to
    owner: dict[tuple[str, str, str], Loaded] = {}  # (mesh or gateway, namespace, host) -> the route holding it
    accepted: list[Loaded] = []
    pools_in = _Pools(backends or {}, endpoints)
    for obj in objects:
        if not isinstance(obj.resource, LLMRoute):
            continue
        route_spec, namespace = obj.resource.spec, obj.resource.metadata.namespace
        check = route_binding(route_spec.gateways, namespace, view)
        match_problems = _match_gateway_problems(obj, check.binding)
        errors = [p for p in match_problems if p.severity == "error"]
        if check.errors or errors:
            problems.extend(Problem(message, file=obj.file, obj=obj.label, field=path, reason=reason)
                            for path, message, reason in check.errors)
            problems.extend(errors)
            continue
        route, route_problems = _compile_route(obj, providers, home if namespaces else None, namespaces, prices,
                                               view, check.binding, declared, pools_in)
        if route_problems:
            problems.extend(route_problems)
            continue
        # Two routes may share a host only when no proxy is bound to both (Istio's rule), in one namespace.
        clash = next((owner[(b, namespace, route_spec.host)] for b in sorted(check.binding)
                      if (b, namespace, route_spec.host) in owner), None)
        if clash is not None:
            problems.append(Problem(f"host {route_spec.host!r} is already routed by {clash.label}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostConflict"))
            continue
        for b in check.binding:
            owner[(b, namespace, route_spec.host)] = obj
        problems.extend(p for p in match_problems if p.severity == "warning")
        accepted.append(obj)
        if view.target in check.binding:
            _claim(claimed, route_spec.host, namespace, route)
            used.update(t.provider_host for rule in route.rules for t in rule.targets)
            used.update(t.provider_host for rule in route.rules if rule.failover is not None
                        for order in rule.failover.orders for t in order)  # fallbackRefs too
        else:
            forward = forward_to([gateway_ref(g, namespace) for g in route_spec.gateways or []], view)
            if forward is not None:
                for name in host_aliases(route_spec.host, namespace):
                    forwarded.setdefault(name, forward)

    # A provider host that no LLMRoute names is routed to the provider itself, where the
    # provider's key is needed (see `extproc.policy.gateway_binding`); an LLMRoute on the same
    # name takes it over (for whoever may use that route). A name forwarded to a gateway stays so.
    referrers: dict[str, list[tuple[str, ...]]] = {host: [] for host in providers}
    for obj in objects:
        if isinstance(obj.resource, LLMRoute):
            bound = declared_binding(obj.resource.spec.gateways, obj.resource.metadata.namespace)
            for host in {ref_host.lower() for rule in obj.resource.spec.rules
                         for ref_host in (*(ref.provider_host for ref in rule.backend_refs),
                                          *(ref.provider_host for ref in rule.fallback_refs)) if ref_host}:
                if host in referrers:
                    referrers[host].append(bound)
    bindings = {host: declared.get(host) or provider_binding(referrers[host]) for host in providers}
    accepted.extend(providers.values())
    accepted.extend(prices.accepted)
    for host, obj in providers.items():
        namespace = obj.resource.metadata.namespace
        if view.target in bindings[host]:
            default = _default_route(obj, home, namespaces, prices)
            names = [name for name in host_aliases(host, namespace) if name not in forwarded]
            if names:
                _claim(claimed, host, namespace, default, names)
                used.add(host)
        else:
            forward = forward_to(bindings[host], view)
            if forward is not None:
                for name in host_aliases(host, namespace):
                    if name not in claimed:
                        forwarded.setdefault(name, forward)
    forwarded = {name: forward for name, forward in forwarded.items() if name not in claimed}

    routes: dict[str, Route] = {}
    claims: dict[str, tuple[Claim, ...]] = {}
    for name, found in claimed.items():
        if len(found) == 1:
            routes[name] = found[0].route
            continue
        claims[name] = tuple(found)
        chosen = pick(claims[name], None, home if namespaces else None)
        if chosen is not None:
            routes[name] = chosen

    def resolve(host: str, namespace: str) -> Route | None:
        name = normalize_host(host)
        if name in claims:
            return pick(claims[name], namespace, home if namespaces else None)
        return routes.get(name)

    budgets = compile_budgets(objects, resolve, problems, accepted, forwarded)
    protection = compile_protection(objects, routes, problems, accepted, namespaces, home)
    clusters = {host: provider_cluster(host) for host in providers if host in used}
    pools = {host: pool for host, pool in pools_in.used.items() if host in used}
    clusters.update((host, provider_cluster(host)) for host in pools)
    all_routes = {id(c.route): c.route for found in claimed.values() for c in found}.values()
    failover_clusters = {t.provider_host: t.cluster for route in all_routes for rule in route.rules
                         if rule.failover is not None for order in rule.failover.orders for t in order
                         if not t.cluster.startswith(RETRY_CLUSTER_PREFIX)}  # a pool's retry cluster goes with it
    health = {host: _health(obj) for host, obj in providers.items()}
    capacity = {host: limits for host, obj in providers.items() if (limits := _limits(obj)) != DEFAULT_PROVIDER_LIMITS}
    table = RoutingTable(routes=routes, clusters=clusters, version=_version(accepted), forwarded=forwarded,
                         budgets=budgets, health=health, failover_clusters=failover_clusters, claims=claims,
                         home=home if namespaces else None, prices=prices.table, protection=protection,
                         capacity=capacity, pools=pools)
    return Compiled(table=table, problems=problems, accepted=accepted)


def _claim(claimed: dict[str, list[Claim]], host: str, namespace: str, route: Route,
           names: list[str] | None = None) -> None:
    """A route's names: its host as written, and with its namespace (qualified)."""
    for name in names if names is not None else host_aliases(host, namespace):
        claimed.setdefault(name, []).append(Claim(route, qualified=name != host))


def _match_gateway_problems(obj: Loaded, binding: frozenset[str]) -> list[Problem]:
    """`matches[].gateways`: a malformed entry is an error; one naming a proxy the route is not
    bound to (its `spec.gateways`) never applies: a warning."""
    resource = obj.resource
    assert isinstance(resource, LLMRoute)
    found: list[Problem] = []
    for i, rule in enumerate(resource.spec.rules):
        for j, match in enumerate(rule.matches):
            for k, entry in enumerate(match.gateways or ()):
                field = f"spec.rules[{i}].matches[{j}].gateways[{k}]"
                try:
                    ref = gateway_ref(entry, resource.metadata.namespace)
                except ValueError as exc:
                    found.append(Problem(str(exc), file=obj.file, obj=obj.label, field=field))
                    continue
                if ref not in binding:
                    bound = ", ".join(sorted(binding))
                    found.append(Problem(f"{ref} never applies: the route is bound to {bound} only (spec.gateways)",
                                         file=obj.file, obj=obj.label, field=field, severity="warning"))
    return found


def _visible(obj: Loaded, home: str | None, namespaces: bool) -> frozenset[str] | None:
    if not namespaces:
        return None
    resource = obj.resource
    assert isinstance(resource, (LLMProvider, LLMRoute))  # the kinds that can be exported
    return visible_to(resource.metadata.namespace, resource.spec.export_to, home)


def _usable_provider(obj: Loaded, provider_host: str, field: str, providers: dict[str, Loaded],
                     problems: list[Problem], home: str | None, namespaces: bool,
                     binding: frozenset[str] = frozenset(), declared: dict[str, tuple[str, ...]] | None = None
                     ) -> Loaded | None:
    """The LLMProvider a route's reference names, if it exists, is exported to the route's
    namespace, and is decided wherever the route is (its own `spec.gateways`, where set); else a
    problem naming the field: a backendRef and a fallbackRef alike, so that no reference reaches
    another namespace's key, or a key to a proxy the provider is kept from."""
    namespace = obj.resource.metadata.namespace
    provider = providers.get(provider_host.lower())
    if provider is None:
        problems.append(Problem(f"no LLMProvider serves host {provider_host!r}", file=obj.file, obj=obj.label,
                                field=field, reason="ProviderNotFound", host=provider_host))
        return None
    if not may_use(namespace if namespaces else None, _visible(provider, home, namespaces)):
        problems.append(Problem(f"LLMProvider {provider.label.split(' ', 1)[1]} (host {provider_host!r}) "
                                f"is not exported to namespace {namespace} (its spec.exportTo)",
                                file=obj.file, obj=obj.label, field=field, reason="ProviderNotExported"))
        return None
    allowed = (declared or {}).get(provider_host.lower())
    if allowed is not None and not binding <= set(allowed):
        missing = ", ".join(sorted(binding - set(allowed)))
        problems.append(Problem(f"LLMProvider {provider.label.split(' ', 1)[1]} (host {provider_host!r}) is decided "
                                f"only at {', '.join(allowed)} (its spec.gateways), not at {missing} where this "
                                "route applies", file=obj.file, obj=obj.label, field=field,
                                reason="ProviderNotBound"))
        return None
    return provider


def _compile_route(obj: Loaded, providers: dict[str, Loaded], home: str | None, namespaces: bool,
                   prices: CompiledPrices, view: View = MESH_VIEW, binding: frozenset[str] = frozenset({MESH}),
                   declared: dict[str, tuple[str, ...]] | None = None, pools: _Pools | None = None
                   ) -> tuple[Route, list[Problem]]:
    resource = obj.resource
    assert isinstance(resource, LLMRoute)
    namespace = resource.metadata.namespace
    route_name = f"{namespace}/{resource.metadata.name}"
    pools = pools if pools is not None else _Pools({}, None)
    problems: list[Problem] = []
    rules: list[Rule] = []
    watched: set[str] = set()
    for i, rule in enumerate(resource.spec.rules):
        rule_label = rule.name or f"rules[{i}]"
        targets: list[Target] = []
        for j, ref in enumerate(rule.backend_refs):
            if ref.backend_ref is not None:
                pool_target = pools.target(obj, ref.backend_ref, f"spec.rules[{i}].backendRefs[{j}]", route_name,
                                           rule_label, problems)
                if pool_target is not None:
                    targets.append(pool_target)
                continue
            assert ref.provider_host is not None
            provider = _usable_provider(obj, ref.provider_host, f"spec.rules[{i}].backendRefs[{j}].providerHost",
                                        providers, problems, home, namespaces, binding, declared)
            if provider is None:
                continue
            targets.append(_target(route_name, rule_label, rule.name, provider, prices))
        # `matches[].gateways` (Istio's): an entry applies only at the proxies it names (default: the route's)
        applying = [m for m in rule.matches
                    if view.target in ({gateway_ref(g, namespace) for g in m.gateways} if m.gateways else binding)]
        conditions = tuple(tuple(_condition(name, match) for name, match in m.headers.items()) for m in applying)
        sources = tuple(labels_of(m.source_labels) if m.source_labels is not None else None for m in applying)
        for conds in conditions:
            watched.update(c.name for c in conds)
        weights = [ref.weight if ref.weight is not None else 1 for ref in rule.backend_refs]
        fallbacks: list[Target] = []
        for j, fallback in enumerate(rule.fallback_refs):
            if fallback.backend_ref is not None:
                pool_target = pools.target(obj, fallback.backend_ref, f"spec.rules[{i}].fallbackRefs[{j}]",
                                           route_name, rule_label, problems)
                if pool_target is not None:
                    fallbacks.append(pool_target)
                continue
            assert fallback.provider_host is not None
            provider = _usable_provider(obj, fallback.provider_host, f"spec.rules[{i}].fallbackRefs[{j}].providerHost",
                                        providers, problems, home, namespaces, binding, declared)
            if provider is None:
                continue
            fallbacks.append(_target(route_name, rule_label, rule.name, provider, prices))
        if rule.matches and not applying:
            continue  # every entry applies at other proxies only: the rule never matches here
        if targets and len(targets) == len(weights) and len(fallbacks) == len(rule.fallback_refs):
            running, cumulative = 0, []
            for w in weights:
                running += w
                cumulative.append(running)
            failover = None
            if rule.retries is not None:
                r = rule.retries
                per_try = parse_duration(r.per_try_timeout) if r.per_try_timeout else None
                policy = RetryPolicy.from_config(r.attempts, per_try, r.retry_on)
                failover = build_failover(tuple(targets), tuple(weights), tuple(fallbacks), policy)
            rules.append(Rule(rule_label, conditions, tuple(targets), tuple(cumulative), failover,
                              sources if any(s is not None for s in sources) else ()))
    bases = route_bases(t for rule in rules for t in rule.targets)
    return Route(route_name, tuple(rules), frozenset(watched), visible=_visible(obj, home, namespaces),
                 bases=bases, namespace=namespace, selector=_selector(resource)), problems


def _selector(resource: LLMRoute | LLMProvider) -> Labels | None:
    selector = resource.spec.workload_selector
    return labels_of(selector.selector) if selector is not None else None


def _default_route(obj: Loaded, home: str | None = None, namespaces: bool = False,
                   prices: CompiledPrices | None = None) -> Route:
    resource = obj.resource
    assert isinstance(resource, LLMProvider)
    name = f"{resource.metadata.namespace}/{resource.metadata.name}"
    target = _target(name, "default", None, obj, prices)
    return Route(name, (Rule("default", (), (target,), (1,)),), frozenset(), visible=_visible(obj, home, namespaces),
                 bases=route_bases([target]), namespace=resource.metadata.namespace, selector=_selector(resource),
                 provider_default=True)


# What a provider's default config (merged with a route-specific one) must name, per API: (field, alias)
_REQUIRED: dict[type[ApiConfig], tuple[tuple[str, str], ...]] = {
    OpenAIConfig: (("model", "model"),),
    AzureOpenAIConfig: (("deployment", "deployment"),),
    AnthropicConfig: (("model", "model"),),
    GeminiConfig: (("model", "model"),),
    BedrockConfig: (("model", "model"), ("region", "region"), ("access_key_id", "accessKeyId"),
                    ("secret_access_key", "secretAccessKey")),
}


def _provider_config_problems(obj: Loaded) -> list[Problem]:
    """An LLMProvider's configs as a whole: the default config names what its API needs (the
    model; Azure's deployment; Bedrock's region and key pair), and a route-specific config
    speaks the default's API (it overrides fields of it)."""
    resource = obj.resource
    assert isinstance(resource, LLMProvider)
    configs = resource.spec.configs
    _, alias, default = configs.default_config.api_config
    found: list[Problem] = []
    for name, field_alias in _REQUIRED[type(default)]:
        if getattr(default, name) is None:
            found.append(Problem("required field is missing", file=obj.file, obj=obj.label,
                                 field=f"spec.configs.defaultConfig.{alias}.{field_alias}"))
    for rule, specific in configs.route_specific_configs.items():
        _, specific_alias, _ = specific.api_config
        if specific_alias != alias:
            found.append(Problem(f"a route-specific config overrides fields of the default config: use {alias} "
                                 f"here too (got {specific_alias})", file=obj.file, obj=obj.label,
                                 field=f"spec.configs.routeSpecificConfigs.{rule}.{specific_alias}"))
    return found


def _api_settings(cfg: ApiConfig) -> ApiSettings | None:
    """What the config's API needs besides model and key (None for OpenAI's)."""
    if isinstance(cfg, AzureOpenAIConfig):
        return ApiSettings(api_version=cfg.api_version, deployment=cfg.deployment or "",
                           embedding_deployment=cfg.embedding_deployment)
    if isinstance(cfg, AnthropicConfig):
        defaults = ApiSettings()
        return ApiSettings(anthropic_version=cfg.version or defaults.anthropic_version,
                           max_tokens=cfg.max_tokens or defaults.max_tokens)
    if isinstance(cfg, GeminiConfig):
        return ApiSettings(api_version=cfg.api_version or DEFAULT_GEMINI_API_VERSION)
    if isinstance(cfg, BedrockConfig):
        return ApiSettings(region=cfg.region or "", access_key_id=cfg.access_key_id or "",
                           secret_access_key=cfg.secret_access_key or "", session_token=cfg.session_token)
    return None


def _target(route: str, rule_label: str, rule_name: str | None, provider: Loaded,
            prices: CompiledPrices | None = None) -> Target:
    resource = provider.resource
    assert isinstance(resource, LLMProvider)
    configs = resource.spec.configs
    _, _, cfg = configs.default_config.api_config
    specific = configs.route_specific_configs.get(rule_name) if rule_name else None
    if specific is not None:
        cfg = _merge(cfg, specific.api_config[2])
    model = cfg.model
    if isinstance(cfg, AzureOpenAIConfig) and model is None:
        model = cfg.deployment  # the name requests and metrics report
    return Target(
        route=route,
        rule=rule_label,
        provider=f"{resource.metadata.namespace}/{resource.metadata.name}",
        provider_host=resource.spec.host,
        cluster=provider_cluster(resource.spec.host),
        path=resource.spec.path,
        model=model,
        stream=cfg.stream if isinstance(cfg, OpenAIConfig | AzureOpenAIConfig) else None,
        api_key=getattr(cfg, "api_key", None),
        timeout_s=resource.spec.timeout_s,
        base_path=base_path(resource.spec.path, resource.spec.base_path),
        embedding_model=cfg.embedding_model if isinstance(cfg, OpenAIConfig) else None,
        prices=prices.table.by_host.get(resource.spec.host, _NO_PRICES) if prices is not None else _NO_PRICES,
        api=cfg.API,
        api_settings=_api_settings(cfg),
    )


def _health(provider: Loaded) -> tuple[int, float]:
    """(consecutive errors, cool-down seconds) for passive health, defaults where not set."""
    resource = provider.resource
    assert isinstance(resource, LLMProvider)
    spec = resource.spec
    if spec.outlier_detection is None:
        return DEFAULT_CONSECUTIVE_ERRORS, DEFAULT_COOL_DOWN_S
    od = spec.outlier_detection
    return od.consecutive_errors, parse_duration(od.base_ejection_time)


def _limits(provider: Loaded) -> ConnectionLimits:
    """The requests in flight a provider's clusters admit: its `spec.connectionPool`, defaults
    where not set (extproc.policy.capacity)."""
    resource = provider.resource
    assert isinstance(resource, LLMProvider)
    pool = resource.spec.connection_pool
    if pool is None:
        return DEFAULT_PROVIDER_LIMITS
    tcp, http, default = pool.tcp, pool.http, DEFAULT_PROVIDER_LIMITS
    return ConnectionLimits(
        max_connections=(tcp and tcp.max_connections) or default.max_connections,
        max_pending_requests=(http and http.http1_max_pending_requests) or default.max_pending_requests,
        max_requests=(http and http.http2_max_requests) or default.max_requests)


def _merge(base: ApiConfig, override: ApiConfig) -> ApiConfig:
    """A route-specific config: its fields where set, the default config's elsewhere (both of one
    API: `_provider_config_problems`). A credential given inline replaces the default's Secret
    reference and the other way round."""
    update = {name: getattr(override, name) for name in type(override).model_fields
              if getattr(override, name) is not None}
    for name, _, ref_name, _ in override.CREDENTIALS:
        if name in update:
            update[ref_name] = None
        elif ref_name in update:
            update[name] = None
    return base.model_copy(update=update)


def _condition(name: str, match: StringMatch) -> HeaderCondition:
    header = name.lower()
    if match.exact is not None:
        return HeaderCondition(header, "exact", match.exact)
    if match.prefix is not None:
        return HeaderCondition(header, "prefix", match.prefix)
    if match.regex is not None:
        return HeaderCondition(header, "regex", match.regex, re.compile(match.regex))
    return HeaderCondition(header, "present")


def _version(objects: list[Loaded]) -> str:
    digest = hashlib.sha256()
    for obj in objects:
        digest.update(obj.resource.model_dump_json(by_alias=True).encode())
    return digest.hexdigest()[:12]


def compile_budgets(objects: list[Loaded], resolve: Callable[[str, str], Route | None], problems: list[Problem],
                    accepted: list[Loaded], forwarded: Mapping[str, object] | None = None) -> BudgetTable:
    """LLMTokenRateLimit objects, each attached to the route its host is routed by, as a caller
    of the object's namespace resolves it (so every name that route answers to is limited). A
    host nobody serves is an error of that object; a host an egress gateway decides (`forwarded`)
    is the gateway's to limit: accepted here, applied there."""
    pairs: list[tuple[str, Budget]] = []
    for obj in objects:
        resource = obj.resource
        if not isinstance(resource, LLMTokenRateLimit):
            continue
        route = resolve(resource.spec.host, resource.metadata.namespace)
        if route is None and normalize_host(resource.spec.host) in (forwarded or {}):
            accepted.append(obj)
            continue
        if route is None:
            problems.append(Problem(f"no LLMRoute or LLMProvider serves host {resource.spec.host!r}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostNotFound",
                                    host=resource.spec.host))
            continue
        key = resource.spec.key
        key_header = key.header.lower() if key is not None and key.header else ""
        rules: list[BudgetRule] = []
        watched: set[str] = {key_header} if key_header else set()
        refused = False
        for i, rule in enumerate(resource.spec.rules):
            conditions = tuple(
                tuple(_condition(name, match) for name, match in m.headers.items()) for m in rule.matches)
            for conds in conditions:
                watched.update(c.name for c in conds)
            rule_name = rule.name or f"rules[{i}]"
            cost_cap: BudgetRule | None = None
            if rule.cost is not None:
                currency, found = cost_currency(route, rule.currency)
                for field, message, reason, severity in found:
                    problems.append(Problem(message, file=obj.file, obj=obj.label, field=f"spec.rules[{i}].{field}",
                                            reason=reason, host=resource.spec.host, severity=severity))
                if not currency:
                    refused = True
                    continue
                # the cap in pico-units of its currency: the bucket's amounts, as a token bucket's are tokens
                cost_cap = BudgetRule(rule_name, conditions, int(Decimal(rule.cost) * PICO_PER_UNIT), rule.per_s,
                                      None if rule.tokens is not None else rule.requests, currency)
            if rule.tokens is None:
                assert cost_cap is not None  # the model checks: tokens, cost or both
                rules.append(cost_cap)
            else:
                rules.append(BudgetRule(rule_name, conditions, rule.tokens, rule.per_s, rule.requests,
                                        cost=cost_cap))
        if refused:
            continue
        name = f"{resource.metadata.namespace}/{resource.metadata.name}"
        pairs.append((route.name, Budget(name, key_header, tuple(rules), frozenset(watched),
                                         key.caller if key is not None and key.caller else "")))
        accepted.append(obj)
    return BudgetTable.of(pairs)


def _reachable(route: Route) -> list[Target]:
    """Every provider target a route's requests may reach: each rule's picks and failover orders."""
    found: dict[tuple[str, str | None, str | None], Target] = {}
    for rule in route.rules:
        targets = list(rule.targets)
        if rule.failover is not None:
            targets += [t for order in rule.failover.orders for t in order]
        for target in targets:
            found.setdefault((target.provider_host, target.model, target.embedding_model), target)
    return list(found.values())


CapProblem = tuple[str, str, str, Literal["error", "warning"]]  # field under the rule, message, reason, severity


def cost_currency(route: Route, currency: str | None) -> tuple[str, list[CapProblem]]:
    """The currency of a cost cap on `route` (as written, or where unset the one its providers
    are priced in; "" where the cap cannot be kept), and its problems: an error where some
    answer could never be priced in it (a provider the route reaches without an LLMPriceTable,
    or priced in another currency: amounts of two currencies are never added); a warning for a
    model a provider's config sends that its table does not price (those requests get 403
    `model_not_priced`: a cost cap never lets through what it cannot charge)."""
    targets = _reachable(route)
    unpriced = sorted({t.provider_host for t in targets if not t.prices})
    if unpriced:
        return "", [("cost", f"route {route.name} reaches {', '.join(unpriced)}, which no LLMPriceTable prices: a "
                             "cost cap could not charge its answers", "ProviderNotPriced", "error")]
    currencies = sorted({next(iter(t.prices.values())).currency for t in targets})
    if currency is None and len(currencies) > 1:
        return "", [("currency", f"the providers of route {route.name} are priced in {' and '.join(currencies)}: "
                                 "a cost cap holds one currency", "CurrencyConflict", "error")]
    wanted = currency or currencies[0]
    other = sorted({t.provider_host for t in targets if next(iter(t.prices.values())).currency != wanted})
    if other:
        return "", [("currency", f"{', '.join(other)} (reached by route {route.name}) is priced in another currency "
                                 f"than {wanted}: a cost cap holds one currency", "CurrencyConflict", "error")]
    warnings: list[CapProblem] = []
    for target in targets:
        for model in dict.fromkeys((target.model, target.embedding_model)):
            if model is not None and model not in target.prices:
                warnings.append(("cost", f"model {model!r}, which {target.provider} sends {target.provider_host}, has "
                                         "no price in its LLMPriceTable: those requests are refused "
                                         "(403 model_not_priced)", "ModelNotPriced", "warning"))
    return wanted, warnings


_NO_PRICES: dict[str, Price] = {}  # shared by every target whose provider has no price table


@dataclass(frozen=True)
class CompiledPrices:
    table: PriceTable
    accepted: list[Loaded]


def compile_prices(objects: list[Loaded], providers: dict[str, Loaded], problems: list[Problem],
                   home: str | None, namespaces: bool) -> CompiledPrices:
    """LLMPriceTable objects: one per LLMProvider host, naming a host an LLMProvider serves. With
    `namespaces` (Kubernetes), a table prices only a provider of its own namespace, or any from
    the control plane's namespace: a namespace cannot set what another's spending costs."""
    by_host: dict[str, dict[str, Price]] = {}
    owner: dict[str, Loaded] = {}
    accepted: list[Loaded] = []
    for obj in objects:
        resource = obj.resource
        if not isinstance(resource, LLMPriceTable):
            continue
        spec, namespace = resource.spec, resource.metadata.namespace
        provider = providers.get(spec.host)
        if provider is None:
            problems.append(Problem(f"no LLMProvider serves host {spec.host!r}", file=obj.file, obj=obj.label,
                                    field="spec.host", reason="HostNotFound", host=spec.host))
            continue
        if namespaces and namespace not in (provider.resource.metadata.namespace, home):
            problems.append(Problem(f"the LLMProvider of host {spec.host!r} is in namespace "
                                    f"{provider.resource.metadata.namespace}: a price table applies to a provider of "
                                    f"its own namespace (or any, from the control plane's)",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="ProviderNotInNamespace"))
            continue
        if spec.host in owner:
            problems.append(Problem(f"host {spec.host!r} is already priced by {owner[spec.host].label}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostConflict"))
            continue
        name = f"{namespace}/{resource.metadata.name}"
        models: dict[str, Price] = {}
        for item in spec.models:
            input_price = price_per_token(item.input)
            models[item.model] = Price(spec.currency, input_price, price_per_token(item.output),
                                       price_per_token(item.cached_input) if item.cached_input is not None
                                       else input_price, name)
        owner[spec.host] = obj
        by_host[spec.host] = models
        accepted.append(obj)
    return CompiledPrices(PriceTable(by_host), accepted)


class _Pools:
    """The Services and InferencePools routes name, as pools of the routing table: each
    `backendRef` checked (same namespace, the object exists, its port), each pool built once."""

    def __init__(self, backends: Mapping[Key, Backend | str], endpoints: Mapping[Key, tuple[str, ...]] | None):
        self._backends = backends
        self._endpoints = endpoints
        self.used: dict[str, Pool] = {}  # host -> pool, for every pool an accepted rule names

    def target(self, obj: Loaded, ref: ObjectRef, field: str, route: str, rule: str,
               problems: list[Problem]) -> Target | None:
        namespace = obj.resource.metadata.namespace

        def problem(message: str, where: str, reason: str = "InvalidBackendRef") -> None:
            problems.append(Problem(message, file=obj.file, obj=obj.label, field=f"{field}.backendRef{where}",
                                    reason=reason))

        if ref.namespace is not None and ref.namespace != namespace:
            problem(f"{ref.kind} {ref.namespace}/{ref.name} is in another namespace than the route ({namespace}): "
                    "a route sends only to model servers of its own namespace", ".namespace", "RefNotPermitted")
            return None
        key = (ref.kind, namespace, ref.name)
        backend = self._backends.get(key)
        if backend is None:
            problem(f"no {ref.kind} {namespace}/{ref.name}", ".name", "BackendNotFound")
            return None
        if isinstance(backend, str):
            problem(f"{ref.kind} {namespace}/{ref.name}: {backend}", "", "InvalidBackend")
            return None
        if backend.kind == "Service":
            port = service_port(backend, ref.port)
            if isinstance(port, str):
                problem(port, ".port")
                return None
            app_protocol = port[2]
            host = f"{ref.name}.{namespace}.svc"
        else:
            numbers = [p[1] for p in backend.ports]
            if ref.port is not None and ref.port not in numbers:
                problem(f"InferencePool {namespace}/{ref.name} has no targetPort {ref.port}", ".port")
                return None
            app_protocol = backend.app_protocol
            host = f"{ref.name}.{namespace}.inferencepool"
        protocol = "https" if ref.tls else "h2c" if app_protocol.lower() in H2C else "http"
        pool = self.used.get(host)
        if pool is None:  # files name the endpoints themselves (ports included); Kubernetes finds them
            found = (backend.annotated or ()) if self._endpoints is None else self._endpoints.get(key, ())
            pool = self.used[host] = Pool(host, backend.kind, f"{namespace}/{ref.name}", protocol, found)
            if self._endpoints is None and backend.annotated is None:
                problems.append(Problem(f"{ref.kind} {namespace}/{ref.name} names no endpoints: in files, give them "
                                        f"as its annotation {ENDPOINTS_ANNOTATION}: \"ip:port, ip:port\" (until "
                                        "then its requests get a 503)", file=obj.file, obj=obj.label,
                                        field=f"{field}.backendRef.name", severity="warning", reason="NoEndpoints"))
        elif pool.protocol != protocol:
            problem(f"{ref.kind} {namespace}/{ref.name} is named elsewhere with another protocol ({pool.protocol}): "
                    "give every backendRef to it the same tls", ".tls")
            return None
        return Target(
            route=route, rule=rule, provider=f"{namespace}/{ref.name}", provider_host=host,
            cluster=provider_cluster(host), path=ref.path, model=ref.model, stream=ref.stream,
            timeout_s=parse_duration(ref.timeout) if ref.timeout else None,
            base_path=base_path(ref.path, None), pool=host)
