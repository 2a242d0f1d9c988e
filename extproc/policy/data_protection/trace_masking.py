"""What a span may carry of a prompt or an answer (docs/tracing.md, "Contents"): the text with
every value a detector finds replaced by its placeholder, and bounded.

Which detectors: every built-in (`secret`, `email`, `phone`, `china-resident-id`, `bank-card`,
`ipv4`), always, and beside them the detectors of every LLMDataPolicy that applies to the route
(its regexes and keywords), whatever their rules' actions: a trace is read by more people than
the application, so what a policy looks for is masked there even where the policy only logs
it, and a secret is masked even where no policy applies. One scanner per set of policies,
compiled once (`Scanner`: linear time, whatever the text).
"""

from __future__ import annotations

from functools import lru_cache

from .detectors import BUILTINS, Pattern
from .policy import Guard
from .scanner import Scanner, masked

MAX_TEXT = 4096  # characters of one text a span keeps; the rest is cut, and said to be
TRUNCATED = "…[truncated]"
BUILTINS_ONLY = "builtins"
WITH_POLICIES = "builtins+policies"

_BUILTIN_PATTERNS: tuple[Pattern, ...] = tuple(p for patterns in BUILTINS.values() for p in patterns)


@lru_cache(maxsize=64)
def _scanner(guard: Guard | None) -> Scanner:
    """Every built-in's patterns and the guard's own (a guard is compared by identity: one per
    route and config)."""
    patterns = list(_BUILTIN_PATTERNS)
    if guard is not None:
        patterns += [p for p in guard.scanner.patterns if p not in patterns]
    return Scanner(patterns)


def masked_with(guard: Guard | None) -> str:
    """Which detectors masked a span's contents: the built-ins, or they and the route's policies'."""
    return WITH_POLICIES if guard is not None else BUILTINS_ONLY


def mask_for_trace(text: str, guard: Guard | None, limit: int = MAX_TEXT) -> str:
    """`text` as a span may carry it: masked, then cut to `limit` characters (after masking, so
    a value is never cut in two and left half readable)."""
    scanner = _scanner(guard)
    raw = text.encode("utf-8", "surrogatepass")
    found = scanner.find(raw)
    if found:
        raw = masked(raw, found, [p.placeholder for p in scanner.patterns])
    out = raw.decode("utf-8", "replace")
    return out if len(out) <= limit else out[:limit] + TRUNCATED
