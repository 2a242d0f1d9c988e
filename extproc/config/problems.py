"""Config problems: what is wrong, and where (file, object, field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Problem:
    message: str
    file: str | None = None
    obj: str | None = None  # "LLMRoute default/dashscope-route"
    field: str | None = None  # "spec.rules[0].backendRefs[0].weight"
    severity: Literal["error", "warning"] = "error"
    reason: str = "InvalidSpec"  # for a Kubernetes condition: InvalidSpec, HostConflict, ProviderNotFound, ...

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
