"""Request header matching, with Istio StringMatch semantics: one home for the rule that routes
(LLMRoute matches) and budgets (LLMTokenRateLimit matches) both read."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

MatchKind = Literal["exact", "prefix", "regex", "present"]


@dataclass(frozen=True, slots=True)
class HeaderCondition:
    """One header test (a regex must match the whole value)."""

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


Matches = tuple[tuple[HeaderCondition, ...], ...]  # OR of ANDs; empty matches everything


def matches_any(matches: Matches, headers: Mapping[str, str]) -> bool:
    """Whether any of the ANDed groups holds (no group at all: everything matches)."""
    if not matches:
        return True
    return any(all(cond.holds(headers) for cond in conds) for conds in matches)
