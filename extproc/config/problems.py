"""Config problems: what is wrong, and where (file, object, field)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Problem:
    message: str
    file: str | None = None
    obj: str | None = None  # "LLMRoute default/dashscope-route"
    field: str | None = None  # "spec.rules[0].backendRefs[0].weight"
    # "note": nothing wrong, worth a line in `extproc validate` (a document of a kind the gateway skips)
    severity: Literal["error", "warning", "note"] = "error"
    reason: str = "InvalidSpec"  # for a Kubernetes condition: InvalidSpec, HostConflict, ProviderNotFound, ...
    # the host the problem is about, where it names one: an object that failed to parse (its
    # spec.host), a host a reference finds no object for. Checks that span objects do not
    # report what the absence of an object that failed to parse causes (`without_consequences`).
    host: str | None = None

    def __str__(self) -> str:
        where = [part for part in (self.file, self.obj, self.field) if part]
        prefix = ": ".join(where)
        return f"{prefix}: {self.message}" if prefix else self.message


class ConfigError(Exception):
    """A config that cannot be used; carries every problem found, not just the first."""

    def __init__(self, problems: list[Problem]):
        self.problems = [p for p in problems if p.severity == "error"]
        super().__init__("\n".join(str(p) for p in self.problems))


def errors(problems: list[Problem]) -> list[Problem]:
    return [p for p in problems if p.severity == "error"]


# Problems of references to a host that would have been served, had its object parsed.
CONSEQUENCES = frozenset({"ProviderNotFound", "HostNotFound"})


def without_consequences(loading: list[Problem], compiling: list[Problem],
                         hosts: Mapping[str, str] | None = None) -> list[Problem]:
    """The problems of compiling the objects that parsed, but for those an object that failed to
    parse explains (a route naming a provider whose own document has an error, a budget on that
    route's host): so both rounds, the objects' own errors and those across objects, are
    reported at once, none twice. `hosts`: each parsed object's host, by its label."""
    unserved = {p.host.lower() for p in loading if p.severity == "error" and p.host}
    kept = []
    for problem in compiling:  # in compile order: providers, routes, then what names their hosts
        if problem.reason in CONSEQUENCES and problem.host is not None and problem.host.lower() in unserved:
            # that object is not served either, for the same reason
            if hosts and problem.obj is not None and problem.obj in hosts:
                unserved.add(hosts[problem.obj].lower())
            continue
        kept.append(problem)
    return kept
