"""LLMDataPolicy objects compiled into guards (`extproc.policy.data_protection.policy`): which
routes each applies to (its `hosts`, or all), for which callers (Kubernetes: its namespace's
workloads, or everyone's for a policy in the control plane's namespace; files: everyone), and
one guard per distinct set of policies, shared by the routes that have that set."""

from __future__ import annotations

from ..policy.data_protection.detectors import BUILTINS, Pattern, keywords_pattern, regex_pattern
from ..policy.data_protection.judge import JudgeSpec
from ..policy.data_protection.policy import Action, DataRule, Guard, ProtectionTable, RouteGuards
from ..policy.table import Route, normalize_host
from .loader import Loaded
from .models import DataRuleSpec, LLMDataPolicy, parse_duration
from .problems import Problem


def compile_protection(objects: list[Loaded], routes: dict[str, Route], problems: list[Problem],
                       accepted: list[Loaded], namespaces: bool = False, home: str | None = None) -> ProtectionTable:
    """Every LLMDataPolicy as guards per route (see the module's docstring). A host no route
    serves is a warning (the policy applies to it once one does), not an error: refusing the
    policy would leave the hosts it does name unprotected."""
    route_names = sorted({route.name for route in routes.values()})
    everyone: dict[str, list[tuple[str, tuple[DataRule, ...]]]] = {name: [] for name in route_names}
    scoped: dict[str, dict[str, list[tuple[str, tuple[DataRule, ...]]]]] = {name: {} for name in route_names}
    for obj in objects:
        resource = obj.resource
        if not isinstance(resource, LLMDataPolicy):
            continue
        spec = resource.spec
        name = f"{resource.metadata.namespace}/{resource.metadata.name}"
        _warnings(obj, resource, routes, problems)
        answers = spec.responses is not None and spec.responses.check
        rules = tuple(_rule(name, i, rule, answers) for i, rule in enumerate(spec.rules))
        if spec.hosts is None:
            applies = route_names
        else:
            applies = sorted({routes[normalize_host(h)].name for h in spec.hosts if normalize_host(h) in routes})
        namespace = resource.metadata.namespace
        for route in applies:
            if not namespaces or namespace == home:
                everyone[route].append((name, rules))
            else:
                scoped[route].setdefault(namespace, []).append((name, rules))
        accepted.append(obj)
    cache: dict[tuple[str, ...], Guard] = {}

    def guard(policies: list[tuple[str, tuple[DataRule, ...]]]) -> Guard | None:
        if not policies:
            return None
        key = tuple(name for name, _ in policies)
        if key not in cache:
            cache[key] = Guard(tuple(rule for _, rules in policies for rule in rules))
        return cache[key]

    by_route: dict[str, RouteGuards] = {}
    for route in route_names:
        if not everyone[route] and not scoped[route]:
            continue
        every = everyone[route]
        by_namespace = {ns: g for ns, own in scoped[route].items() if (g := guard(every + own)) is not None}
        local = guard(every + [p for own in scoped[route].values() for p in own])
        by_route[route] = RouteGuards(guard(every), by_namespace, local)
    return ProtectionTable(by_route)


def _rule(policy: str, index: int, rule: DataRuleSpec, answers: bool = False) -> DataRule:
    patterns: list[Pattern] = []
    judge = None
    for detector in rule.detectors:
        if detector.builtin is not None:
            patterns.extend(BUILTINS[detector.builtin])
        elif detector.regex is not None:
            patterns.append(regex_pattern(detector.label, detector.regex))
        elif detector.keywords is not None:
            patterns.append(keywords_pattern(detector.label, detector.keywords))
        elif detector.judge is not None:
            j = detector.judge
            judge = JudgeSpec(j.host, j.model, parse_duration(j.timeout), j.fail_open)
    return DataRule(policy, rule.name or f"rules[{index}]", Action[rule.action.upper()],
                    tuple(d.label for d in rule.detectors), tuple(patterns), judge, answers)


def _warnings(obj: Loaded, policy: LLMDataPolicy, routes: dict[str, Route], problems: list[Problem]) -> None:
    """What is accepted but does not do all it may seem to."""
    spec = policy.spec

    def warn(field: str, message: str, reason: str = "NotImplemented") -> None:
        problems.append(Problem(message, file=obj.file, obj=obj.label, field=field, severity="warning",
                                reason=reason))

    for i, host in enumerate(spec.hosts or []):
        if normalize_host(host) not in routes:
            warn(f"spec.hosts[{i}]", f"no LLMRoute or LLMProvider serves host {host!r} (yet): the policy applies "
                                     "to it once one does", "HostNotFound")
    if spec.responses is not None and spec.responses.check and all(
            d.judge is not None for rule in spec.rules for d in rule.detectors):
        warn("spec.responses.check", "answers are checked by pattern detectors (builtin, regex, keywords) only, and "
                                     "no rule of this policy has one: its answers are not checked (a judge is asked "
                                     "about prompts)", "NothingToCheck")
    for i, rule in enumerate(spec.rules):
        for j, detector in enumerate(rule.detectors):
            if detector.judge is not None:
                if normalize_host(detector.judge.host) not in routes:
                    warn(f"spec.rules[{i}].detectors[{j}].judge.host",
                         f"no LLMRoute or LLMProvider serves host {detector.judge.host!r}: the judge cannot be "
                         "asked (failOpen decides)", "HostNotFound")
