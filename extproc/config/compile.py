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

from ..names import provider_cluster
from ..routing import HeaderCondition, Route, RoutingTable, Rule, Target, host_aliases
from .loader import Loaded
from ..failover import DEFAULT_CONSECUTIVE_ERRORS, DEFAULT_COOL_DOWN_S, RetryPolicy, build_failover
from .models import LLMProvider, LLMRoute, OpenAIConfig, parse_duration, unimplemented_fields
from .problems import Problem


@dataclass(frozen=True)
class Compiled:
    table: RoutingTable
    problems: list[Problem]
    accepted: list[Loaded]  # the objects that made it into the table


def compile_config(objects: list[Loaded]) -> Compiled:
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
        if spec.configs.default_config.openai_config.model is None:
            problems.append(Problem("required field is missing", file=obj.file, obj=obj.label,
                                    field="spec.configs.defaultConfig.openAIConfig.model"))
            continue
        if spec.host in providers:
            problems.append(Problem(f"host {spec.host!r} is already served by {providers[spec.host].label}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostConflict"))
            continue
        providers[spec.host] = obj

    routes: dict[str, Route] = {}
    owner: dict[str, Loaded] = {}
    accepted: list[Loaded] = []
    for obj in objects:
        if not isinstance(obj.resource, LLMRoute):
            continue
        route, route_problems = _compile_route(obj, providers)
        if route_problems:
            problems.extend(route_problems)
            continue
        aliases = host_aliases(obj.resource.spec.host, obj.resource.metadata.namespace)
        clash = next((name for name in aliases if name in owner), None)
        if clash is not None:
            problems.append(Problem(f"host {clash!r} is already routed by {owner[clash].label}",
                                    file=obj.file, obj=obj.label, field="spec.host", reason="HostConflict"))
            continue
        for name in aliases:
            routes[name] = route
            owner[name] = obj
        accepted.append(obj)

    # A provider host that no LLMRoute names is routed to the provider itself. Its exact host is
    # claimed before any provider's namespace aliases; a name an LLMRoute holds stays the route's.
    defaults = {host: _default_route(obj) for host, obj in providers.items()}
    accepted.extend(providers.values())
    for host in providers:
        routes.setdefault(host, defaults[host])
    for host, obj in providers.items():
        for name in host_aliases(host, obj.resource.metadata.namespace)[1:]:
            routes.setdefault(name, defaults[host])

    clusters = {host: provider_cluster(host) for host in providers}
    health = {host: _health(obj) for host, obj in providers.items()}
    table = RoutingTable(routes=routes, clusters=clusters, version=_version(accepted), health=health)
    return Compiled(table=table, problems=problems, accepted=accepted)


def _compile_route(obj: Loaded, providers: dict[str, Loaded]) -> tuple[Route, list[Problem]]:
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
            host = ref.provider_host.lower()
            provider = providers.get(host)
            if provider is None:
                problems.append(Problem(f"no LLMProvider serves host {ref.provider_host!r}", file=obj.file,
                                        obj=obj.label, field=f"spec.rules[{i}].backendRefs[{j}].providerHost",
                                        reason="ProviderNotFound"))
                continue
            targets.append(_target(route_name, rule_label, rule.name, provider))
        conditions = tuple(
            tuple(_condition(name, match) for name, match in m.headers.items()) for m in rule.matches
        )
        for conds in conditions:
            watched.update(c.name for c in conds)
        weights = [ref.weight if ref.weight is not None else 1 for ref in rule.backend_refs]
        fallbacks: list[Target] = []
        for j, ref in enumerate(rule.fallback_refs):
            provider = providers.get(ref.provider_host.lower())
            if provider is None:
                problems.append(Problem(f"no LLMProvider serves host {ref.provider_host!r}", file=obj.file,
                                        obj=obj.label, field=f"spec.rules[{i}].fallbackRefs[{j}].providerHost",
                                        reason="ProviderNotFound"))
                continue
            fallbacks.append(_target(route_name, rule_label, rule.name, provider))
        if targets and len(targets) == len(weights) and len(fallbacks) == len(rule.fallback_refs):
            running, cumulative = 0, []
            for w in weights:
                running += w
                cumulative.append(running)
            failover = None
            if rule.retries is not None:
                r = rule.retries
                policy = RetryPolicy.from_config(r.attempts, parse_duration(r.per_try_timeout) if r.per_try_timeout else None,
                                                 r.retry_on)
                failover = build_failover(tuple(targets), tuple(weights), tuple(fallbacks), policy)
            rules.append(Rule(rule_label, conditions, tuple(targets), tuple(cumulative), failover))
    return Route(route_name, tuple(rules), frozenset(watched)), problems


def _default_route(obj: Loaded) -> Route:
    resource = obj.resource
    name = f"{resource.metadata.namespace}/{resource.metadata.name}"
    target = _target(name, "default", None, obj)
    return Route(name, (Rule("default", (), (target,), (1,)),), frozenset())


def _target(route: str, rule_label: str, rule_name: str | None, provider: Loaded) -> Target:
    resource = provider.resource
    assert isinstance(resource, LLMProvider)
    configs = resource.spec.configs
    cfg = configs.default_config.openai_config
    specific = configs.route_specific_configs.get(rule_name) if rule_name else None
    if specific is not None:
        cfg = _merge(cfg, specific.openai_config)
    return Target(
        route=route,
        rule=rule_label,
        provider=f"{resource.metadata.namespace}/{resource.metadata.name}",
        provider_host=resource.spec.host,
        cluster=provider_cluster(resource.spec.host),
        path=resource.spec.path,
        model=cfg.model,
        stream=cfg.stream,
        api_key=cfg.api_key,
        timeout_s=resource.spec.timeout_s,
    )


def _health(provider: Loaded) -> tuple[int, float]:
    """(consecutive errors, cool-down seconds) for passive health, defaults where not set."""
    spec = provider.resource.spec
    if spec.outlier_detection is None:
        return DEFAULT_CONSECUTIVE_ERRORS, DEFAULT_COOL_DOWN_S
    od = spec.outlier_detection
    return od.consecutive_errors, parse_duration(od.base_ejection_time)


def _merge(base: OpenAIConfig, override: OpenAIConfig) -> OpenAIConfig:
    """A route-specific config: its fields where set, the default config's elsewhere."""
    return base.model_copy(update=override.model_dump(exclude_none=True))


def _condition(name: str, match) -> HeaderCondition:
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
