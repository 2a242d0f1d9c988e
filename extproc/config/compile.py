"""Turn parsed objects into a routing table, checking what spans objects.

Per-object checks live in the models; here are the ones that need the whole set: duplicated
hosts, a providerHost no LLMProvider serves, and the provider configs a rule ends up with.
An object that fails a check is left out (with an error naming it); the rest still compile,
so a caller can choose between "all or nothing" (files) and "skip the bad one" (Kubernetes).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from ..policy.budgets import Budget, BudgetRule, BudgetTable
from ..policy.failover import build_failover
from ..policy.gateway_binding import (
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
from ..policy.pricing import Price, PriceTable, price_per_token
from ..policy.provider_api import DEFAULT_GEMINI_API_VERSION
from ..policy.table import (
    ApiSettings,
    Forward,
    RetryPolicy,
    Route,
    RoutingTable,
    Rule,
    Target,
    host_aliases,
    normalize_host,
)
from ..policy.visibility import may_use, visible_to
from ..protocol import provider_cluster
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
    OpenAIConfig,
    StringMatch,
    parse_duration,
    unimplemented_fields,
)
from .problems import Problem


@dataclass(frozen=True)
class Compiled:
    table: RoutingTable
    problems: list[Problem]
    accepted: list[Loaded]  # the objects that made it into the table


def compile_config(objects: list[Loaded], view: View = MESH_VIEW, namespaces: bool = False,
                   home: str | None = None) -> Compiled:
    """The routing table for `view` (the mesh, or one egress gateway; see `extproc.policy.gateway_binding`).
    Which objects are accepted does not depend on the view, except that the mesh view also
    refuses a route naming an egress gateway it does not know.

    With `namespaces` (Kubernetes, where each namespace has its own authors), a route may use
    only providers exported to its namespace, and each route records the namespaces whose
    workloads may use it (see `extproc.policy.visibility`; `home` is the control plane's namespace).
    Without (files, which the operator writes), every object may use every other."""
    problems: list[Problem] = []
    for obj in objects:
        for path in unimplemented_fields(obj.resource):
            problems.append(Problem("accepted but not implemented yet: it has no effect",
                                    file=obj.file, obj=obj.label, field=path, severity="warning",
                                    reason="NotImplemented"))

    providers: dict[str, Loaded] = {}
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
        providers[spec.host] = obj

    prices = compile_prices(objects, providers, problems, home if namespaces else None, namespaces)
    routes: dict[str, Route] = {}
    forwarded: dict[str, Forward] = {}
    used: set[str] = set()  # provider hosts the routes served here send to
    owner: dict[tuple[str, str], Loaded] = {}  # (mesh or gateway, host name) -> the route holding it
    accepted: list[Loaded] = []
    for obj in objects:
        if not isinstance(obj.resource, LLMRoute):
            continue
        route_spec, namespace = obj.resource.spec, obj.resource.metadata.namespace
        check = route_binding(route_spec.gateways, namespace, view)
        if check.errors:
            problems.extend(Problem(message, file=obj.file, obj=obj.label, field=path, reason=reason)
                            for path, message, reason in check.errors)
            continue
        route, route_problems = _compile_route(obj, providers, home if namespaces else None, namespaces, prices)
        if route_problems:
            problems.extend(route_problems)
            continue
        # Two routes may share a host only when no proxy is bound to both (Istio's rule).
        aliases = host_aliases(route_spec.host, namespace)
        clash = next(((name, owner[(b, name)]) for name in aliases for b in sorted(check.binding)
                      if (b, name) in owner), None)
        if clash is not None:
            problems.append(Problem(f"host {clash[0]!r} is already routed by {clash[1].label}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostConflict"))
            continue
        for b in check.binding:
            for name in aliases:
                owner[(b, name)] = obj
        accepted.append(obj)
        if view.target in check.binding:
            for name in aliases:
                routes[name] = route
            used.update(t.provider_host for rule in route.rules for t in rule.targets)
            used.update(t.provider_host for rule in route.rules if rule.failover is not None
                        for order in rule.failover.orders for t in order)  # fallbackRefs too
        else:
            forward = forward_to([gateway_ref(g, namespace) for g in route_spec.gateways or []], view)
            if forward is not None:
                for name in aliases:
                    forwarded.setdefault(name, forward)

    forwarded = {name: forward for name, forward in forwarded.items() if name not in routes}

    # A provider host that no LLMRoute names is routed to the provider itself, where the
    # provider's key is needed (see `extproc.policy.gateway_binding`). Its exact host is claimed before any
    # provider's namespace aliases; a name an LLMRoute holds (here or forwarded) stays the route's.
    referrers: dict[str, list[tuple[str, ...]]] = {host: [] for host in providers}
    for obj in objects:
        if isinstance(obj.resource, LLMRoute):
            declared = declared_binding(obj.resource.spec.gateways, obj.resource.metadata.namespace)
            for host in {ref_host.lower() for rule in obj.resource.spec.rules
                         for ref_host in (*(ref.provider_host for ref in rule.backend_refs),
                                          *(ref.provider_host for ref in rule.fallback_refs))}:
                if host in referrers:
                    referrers[host].append(declared)
    defaults = {host: _default_route(obj, home, namespaces, prices) for host, obj in providers.items()}
    bindings = {host: provider_binding(referrers[host]) for host in providers}
    accepted.extend(providers.values())
    accepted.extend(prices.accepted)
    for exact in (True, False):
        for host, obj in providers.items():
            names = host_aliases(host, obj.resource.metadata.namespace)
            for name in names[:1] if exact else names[1:]:
                if name in routes or name in forwarded:
                    continue
                if view.target in bindings[host]:
                    routes[name] = defaults[host]
                    used.add(host)
                else:
                    forward = forward_to(bindings[host], view)
                    if forward is not None:
                        forwarded[name] = forward

    budgets = compile_budgets(objects, routes, problems, accepted)
    clusters = {host: provider_cluster(host) for host in providers if host in used}
    failover_clusters = {t.provider_host: t.cluster for route in routes.values() for rule in route.rules
                         if rule.failover is not None for order in rule.failover.orders for t in order}
    health = {host: _health(obj) for host, obj in providers.items()}
    table = RoutingTable(routes=routes, clusters=clusters, version=_version(accepted), forwarded=forwarded,
                         budgets=budgets, health=health, failover_clusters=failover_clusters,
                         prices=prices.table)
    return Compiled(table=table, problems=problems, accepted=accepted)


def _visible(obj: Loaded, home: str | None, namespaces: bool) -> frozenset[str] | None:
    if not namespaces:
        return None
    resource = obj.resource
    assert isinstance(resource, (LLMProvider, LLMRoute))  # the kinds that can be exported
    return visible_to(resource.metadata.namespace, resource.spec.export_to, home)


def _usable_provider(obj: Loaded, provider_host: str, field: str, providers: dict[str, Loaded],
                     problems: list[Problem], home: str | None, namespaces: bool) -> Loaded | None:
    """The LLMProvider a route's reference names, if it exists and is exported to the route's
    namespace (else a problem naming the field): a backendRef and a fallbackRef alike, so that no
    reference reaches another namespace's key."""
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
    return provider


def _compile_route(obj: Loaded, providers: dict[str, Loaded], home: str | None,
                   namespaces: bool, prices: CompiledPrices) -> tuple[Route, list[Problem]]:
    resource = obj.resource
    assert isinstance(resource, LLMRoute)
    route_name = f"{resource.metadata.namespace}/{resource.metadata.name}"
    problems: list[Problem] = []
    rules: list[Rule] = []
    watched: set[str] = set()
    for i, rule in enumerate(resource.spec.rules):
        rule_label = rule.name or f"rules[{i}]"
        targets: list[Target] = []
        for j, ref in enumerate(rule.backend_refs):
            provider = _usable_provider(obj, ref.provider_host, f"spec.rules[{i}].backendRefs[{j}].providerHost",
                                        providers, problems, home, namespaces)
            if provider is None:
                continue
            targets.append(_target(route_name, rule_label, rule.name, provider, prices))
        conditions = tuple(
            tuple(_condition(name, match) for name, match in m.headers.items()) for m in rule.matches
        )
        for conds in conditions:
            watched.update(c.name for c in conds)
        weights = [ref.weight if ref.weight is not None else 1 for ref in rule.backend_refs]
        fallbacks: list[Target] = []
        for j, fallback in enumerate(rule.fallback_refs):
            provider = _usable_provider(obj, fallback.provider_host, f"spec.rules[{i}].fallbackRefs[{j}].providerHost",
                                        providers, problems, home, namespaces)
            if provider is None:
                continue
            fallbacks.append(_target(route_name, rule_label, rule.name, provider, prices))
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
            rules.append(Rule(rule_label, conditions, tuple(targets), tuple(cumulative), failover))
    bases = route_bases(t for rule in rules for t in rule.targets)
    return Route(route_name, tuple(rules), frozenset(watched), visible=_visible(obj, home, namespaces),
                 bases=bases), problems


def _default_route(obj: Loaded, home: str | None = None, namespaces: bool = False,
                   prices: CompiledPrices | None = None) -> Route:
    resource = obj.resource
    name = f"{resource.metadata.namespace}/{resource.metadata.name}"
    target = _target(name, "default", None, obj, prices)
    return Route(name, (Rule("default", (), (target,), (1,)),), frozenset(), visible=_visible(obj, home, namespaces),
                 bases=route_bases([target]))


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


def compile_budgets(objects: list[Loaded], routes: dict[str, Route], problems: list[Problem],
                    accepted: list[Loaded]) -> BudgetTable:
    """LLMTokenRateLimit objects, each attached to the route its host is routed by (so every
    name that route answers to is limited). A host nobody serves is an error of that object."""
    pairs: list[tuple[str, Budget]] = []
    for obj in objects:
        resource = obj.resource
        if not isinstance(resource, LLMTokenRateLimit):
            continue
        route = routes.get(normalize_host(resource.spec.host))
        if route is None:
            problems.append(Problem(f"no LLMRoute or LLMProvider serves host {resource.spec.host!r}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostNotFound",
                                    host=resource.spec.host))
            continue
        key_header = resource.spec.key.header.lower() if resource.spec.key else ""
        rules: list[BudgetRule] = []
        watched: set[str] = {key_header} if key_header else set()
        for i, rule in enumerate(resource.spec.rules):
            conditions = tuple(
                tuple(_condition(name, match) for name, match in m.headers.items()) for m in rule.matches)
            for conds in conditions:
                watched.update(c.name for c in conds)
            rules.append(BudgetRule(rule.name or f"rules[{i}]", conditions, rule.tokens, rule.per_s, rule.requests))
        name = f"{resource.metadata.namespace}/{resource.metadata.name}"
        pairs.append((route.name, Budget(name, key_header, tuple(rules), frozenset(watched))))
        accepted.append(obj)
    return BudgetTable.of(pairs)


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
