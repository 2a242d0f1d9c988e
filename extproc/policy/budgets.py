"""Token and request budgets (`LLMTokenRateLimit`): pure decisions, no I/O.

A budget object names a host and a key header; its first matching rule gives a bucket per
(object, rule, key value). A bucket is kept as what has been *used* (tokens and requests), which
drains continuously at `limit / per`: the level a client sees is `limit - used`. Keeping the
used amount rather than the level means a live change of the limit applies at once to buckets
already in use (a bigger budget admits again without waiting for a refill).

Admission (on the request path): tokens while `used < limit` (the bucket is above zero), and,
where `requests` is set, while one more request fits (`used + 1 <= requests`); the request is
counted at admission. Tokens are charged when the answer ends (from the access log), so one
request may overdraw and the next ones wait for the refill.

Where the counts live (in process, or shared through Redis) is `extproc.policy.budget_gate`'s concern.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import lru_cache

import orjson

from ..errors import GatewayError
from .matching import Matches, matches_any

BUCKET_PREFIX = "llmgw:budget"


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """One rule of an LLMTokenRateLimit: which requests, and how much per `per_s`."""

    name: str  # the rule's name, or "rules[i]"
    matches: Matches  # OR of ANDs; empty matches everything
    tokens: int
    per_s: float
    requests: int | None = None
    token_rate: float = field(init=False)  # tokens drained from `used` per second
    request_rate: float = field(init=False)

    def __post_init__(self) -> None:  # computed once: admission reads them per request
        object.__setattr__(self, "token_rate", self.tokens / self.per_s)
        object.__setattr__(self, "request_rate", (self.requests or 1) / self.per_s)

    def applies(self, headers: Mapping[str, str]) -> bool:
        return matches_any(self.matches, headers)


@dataclass(frozen=True, slots=True)
class Budget:
    """One LLMTokenRateLimit object, compiled."""

    name: str  # "namespace/name"
    key_header: str  # lower case; "" when the object has no key (one budget for everyone)
    rules: tuple[BudgetRule, ...]
    watched: frozenset[str]  # header names the rules and the key read

    def select(self, headers: Mapping[str, str]) -> BudgetRule | None:
        """The first rule that matches; None means the request is not limited by this object."""
        for rule in self.rules:
            if rule.applies(headers):
                return rule
        return None


@dataclass(frozen=True)
class BudgetTable:
    """The budgets of a config: by the route name a request is routed by, and each rule by
    (object, rule) for charging."""

    by_route: Mapping[str, tuple[Budget, ...]] = field(default_factory=dict)
    rules: Mapping[tuple[str, str], BudgetRule] = field(default_factory=dict)

    @staticmethod
    def of(pairs: list[tuple[str, Budget]]) -> BudgetTable:
        by_route: dict[str, tuple[Budget, ...]] = {}
        rules: dict[tuple[str, str], BudgetRule] = {}
        for route, budget in pairs:
            by_route[route] = (*by_route.get(route, ()), budget)
            for rule in budget.rules:
                rules[(budget.name, rule.name)] = rule
        return BudgetTable(by_route, rules)


EMPTY_BUDGETS = BudgetTable()


@lru_cache(maxsize=65536)
def key_hash(value: str) -> str:
    """The key value as it may appear in logs, metadata and Redis: never raw."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def bucket_id(budget: str, rule: str, hashed_key: str) -> str:
    """The bucket's name, also its Redis key. The rule name (free text) comes last."""
    return f"{BUCKET_PREFIX}:{budget}:{hashed_key}:{rule}"


def parse_bucket_id(bucket: str) -> tuple[str, str, str] | None:
    """(object, rule, key hash) of a bucket name, or None if it is not one."""
    parts = bucket.split(":", 4)
    if len(parts) != 5 or f"{parts[0]}:{parts[1]}" != BUCKET_PREFIX:
        return None
    return parts[2], parts[4], parts[3]


def drained(used: float, rate: float, elapsed_s: float) -> float:
    """What is still used after `elapsed_s` of draining at `rate` per second (never below zero)."""
    return max(0.0, used - rate * max(0.0, elapsed_s))


@dataclass(slots=True)  # not frozen: built per request, and a frozen dataclass costs microseconds to build
class Admission:
    """The answer for one bucket: admitted or not, and what the client is told."""

    allowed: bool
    reason: str  # "" when allowed, else "tokens" or "requests"
    retry_after_s: int  # whole seconds until a refused request would pass (0 when allowed)
    headers: tuple[tuple[str, str], ...]  # OpenAI's x-ratelimit-* headers
    remaining_tokens: int


def admission(rule: BudgetRule, used_tokens: float, used_requests: float) -> Admission:
    """Whether a request may go now, given what its bucket has used (already drained to now)."""
    tokens_ok = used_tokens < rule.tokens
    requests_ok = rule.requests is None or used_requests + 1 <= rule.requests + 1e-9
    allowed = tokens_ok and requests_ok
    waits: list[tuple[float, str]] = []
    if not tokens_ok:  # until the bucket is above zero (strictly: exactly zero still refuses)
        waits.append((math.floor((used_tokens - rule.tokens) / rule.token_rate + 1e-9) + 1, "tokens"))
    if not requests_ok:  # until one more request fits
        assert rule.requests is not None
        waits.append((math.ceil((used_requests + 1 - rule.requests) / rule.request_rate - 1e-9), "requests"))
    wait, reason = max(waits) if waits else (0, "")
    retry_after = 0 if allowed else max(1, int(wait))
    remaining_tokens = max(0, math.floor(rule.tokens - used_tokens))
    headers = [
        ("x-ratelimit-limit-tokens", str(rule.tokens)),
        ("x-ratelimit-remaining-tokens", str(remaining_tokens)),
        ("x-ratelimit-reset-tokens", openai_duration(used_tokens / rule.token_rate)),
    ]
    if rule.requests is not None:
        after = used_requests + (1 if allowed else 0)  # this request counts when it is admitted
        headers += [
            ("x-ratelimit-limit-requests", str(rule.requests)),
            ("x-ratelimit-remaining-requests", str(max(0, math.floor(rule.requests - after + 1e-9)))),
            ("x-ratelimit-reset-requests", openai_duration(after / rule.request_rate)),
        ]
    return Admission(allowed, reason, retry_after, tuple(headers), remaining_tokens)


def openai_duration(seconds: float) -> str:
    """A wait as OpenAI writes it in x-ratelimit-reset-*: "20ms", "1s", "6m0s", "1h2m3s"."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    total = math.ceil(seconds - 1e-9)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


def most_restrictive(answers: list[Admission]) -> Admission:
    """The answer the client is told about when several objects limit one request: a refusal
    (the longest wait) before an admission (the fewest tokens left)."""
    refused = [a for a in answers if not a.allowed]
    if refused:
        return max(refused, key=lambda a: a.retry_after_s)
    return min(answers, key=lambda a: a.remaining_tokens)


# metadata keys (namespace `llm_gateway`) the ext_proc writes for Envoy's response headers
HEADER_METADATA = {
    "x-ratelimit-limit-tokens": "ratelimit_limit_tokens",
    "x-ratelimit-remaining-tokens": "ratelimit_remaining_tokens",
    "x-ratelimit-reset-tokens": "ratelimit_reset_tokens",
    "x-ratelimit-limit-requests": "ratelimit_limit_requests",
    "x-ratelimit-remaining-requests": "ratelimit_remaining_requests",
    "x-ratelimit-reset-requests": "ratelimit_reset_requests",
}


class BudgetRefused(GatewayError):
    """A 429 with OpenAI's rate-limit error body and headers."""

    def __init__(self, budget: str, rule: str, answer: Admission):
        what = "tokens" if answer.reason == "tokens" else "requests"
        super().__init__(429, f"rate limit reached for {what} ({budget}, rule {rule}): "
                              f"retry after {answer.retry_after_s}s", "rate_limit_exceeded", what)
        self.headers = (("retry-after", str(answer.retry_after_s)), *answer.headers)

    def body(self, client_api: str = "openai") -> bytes:
        if client_api != "openai":
            return super().body(client_api)
        return orjson.dumps({"error": {"message": self.message, "type": self.kind, "param": None,
                                       "code": self.code}})


def has_budgets(budgets: BudgetTable) -> bool:
    """Whether a config limits any request (its answers then carry x-ratelimit-* headers, and
    finished answers are charged)."""
    return bool(budgets.by_route)


_TOKEN_HEADERS = tuple(name for name in HEADER_METADATA if name.endswith("-tokens"))
_REQUEST_HEADERS = tuple(name for name in HEADER_METADATA if name.endswith("-requests"))


def response_headers(budgets: BudgetTable) -> frozenset[str]:
    """The x-ratelimit-* headers a config's admitted answers can carry: none without budgets, the
    `-requests` ones only where a rule counts requests (Envoy formats each for every answer)."""
    if not has_budgets(budgets):
        return frozenset()
    counts_requests = any(rule.requests is not None for rule in budgets.rules.values())
    return frozenset(_TOKEN_HEADERS + (_REQUEST_HEADERS if counts_requests else ()))


def budget_unavailable() -> GatewayError:
    """--redis-fail-closed while the shared counts cannot be reached."""
    return GatewayError(503, "the rate-limit store is unreachable: limited requests are refused until it is back",
                        "rate_limit_unavailable", "server_error")


def is_charged(outcome: str) -> bool:
    """Whether a finished request's usage is charged at all: only a successful answer's (an
    error or a cut stream costs nothing). The access log asks first, to read nothing more."""
    return outcome == "success"


def tokens_to_charge(outcome: str, total_tokens: float | None, prompt_tokens: float | None,
                     completion_tokens: float | None) -> int:
    """What a finished request costs its buckets: the provider's usage of a successful answer;
    nothing for an error, a cut stream or an answer without usage."""
    if not is_charged(outcome):
        return 0
    if total_tokens is not None:
        return max(0, int(total_tokens))
    if prompt_tokens is not None or completion_tokens is not None:
        return max(0, int((prompt_tokens or 0) + (completion_tokens or 0)))
    return 0


def describe(table: BudgetTable, route: str, headers: Mapping[str, str]) -> list[str]:
    """For `extproc route`: which budget, rule and key a request would be charged to."""
    lines = []
    for budget in table.by_route.get(route, ()):
        rule = budget.select(headers)
        if rule is None:
            lines.append(f"budget {budget.name}: no rule matches: not limited")
            continue
        key = headers.get(budget.key_header, "") if budget.key_header else ""
        source = f"header {budget.key_header}" if budget.key_header else "no key: one budget for all"
        requests = f", {rule.requests} requests" if rule.requests is not None else ""
        lines.append(f"budget {budget.name}: rule {rule.name}: {rule.tokens} tokens{requests} per {rule.per_s:g}s, "
                     f"key {key_hash(key)} ({source})")
    return lines
