"""Token and request budgets (`LLMTokenRateLimit`): pure decisions, no I/O.

A budget object names a host and a key: a request header, or the verified caller (its
namespace, ServiceAccount or workload: `extproc.policy.caller`, which no application can
choose); its first matching rule gives a bucket per (object, rule, key value). A bucket is
kept as what has been *used* (tokens and requests), which drains continuously at
`limit / per`: the level a client sees is `limit - used`. Keeping the used amount rather than
the level means a live change of the limit applies at once to buckets already in use (a
bigger budget admits again without waiting for a refill).

Admission (on the request path): tokens while `used < limit` (the bucket is above zero), and,
where `requests` is set, while one more request fits (`used + 1 <= requests`); the request is
counted at admission. Tokens are charged when the answer ends (from the access log), so one
request may overdraw and the next ones wait for the refill.

A rule may also cap cost (`cost: "20.00"`, in one currency): a bucket of its own, kept exactly as
a token bucket is (its amounts are pico-units of the currency instead of tokens: the same
admission, drain, mirror and Redis scripts), charged with the answer's exact cost
(`extproc.policy.pricing`), from the same usage, where its tokens are charged. A rule capping
tokens and cost has two buckets; one capping cost alone has its cost bucket only (its `requests`,
if any, counted there).

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
from .caller import Caller, caller_key
from .matching import Matches, matches_any
from .pricing import Price, format_amount

BUCKET_PREFIX = "llmgw:budget"
COST_BUCKET_PREFIX = "llmgw:budget-cost"  # a rule's cost cap: its amounts are pico-units of its currency
MICRO = 10**6  # pico-units per micro-unit: what a cost header shows (six decimals, as a cap is written)


@dataclass(frozen=True, slots=True)
class BudgetRule:
    """One rule of an LLMTokenRateLimit: which requests, and how much per `per_s`. Also the
    parameters of one bucket: where `currency` is set, a cost bucket, whose `tokens` is the cap
    in pico-units of that currency (every amount of the bucket is, so it is kept, shared and
    admitted exactly as a token bucket is)."""

    name: str  # the rule's name, or "rules[i]"
    matches: Matches  # OR of ANDs; empty matches everything
    tokens: int  # the bucket's limit: tokens, or pico-units of `currency` for a cost bucket
    per_s: float
    requests: int | None = None
    currency: str = ""  # "": a token bucket; else a cost bucket, in this currency (ISO 4217)
    cost: BudgetRule | None = None  # the rule's cost cap, a second bucket, where it caps tokens too
    token_rate: float = field(init=False)  # tokens drained from `used` per second
    request_rate: float = field(init=False)

    def __post_init__(self) -> None:  # computed once: admission reads them per request
        object.__setattr__(self, "token_rate", self.tokens / self.per_s)
        object.__setattr__(self, "request_rate", (self.requests or 1) / self.per_s)

    def applies(self, headers: Mapping[str, str]) -> bool:
        return matches_any(self.matches, headers)

    def buckets(self) -> tuple[BudgetRule, ...]:
        """The rule's buckets: itself, and its cost cap where it has one beside tokens."""
        return (self, self.cost) if self.cost is not None else (self,)

    def describe_limits(self) -> str:
        """What the rule caps, as `extproc route` says it: "2000 tokens, 20 CNY, 600 requests"."""
        parts = [f"{format_amount(bucket.tokens)} {bucket.currency}" if bucket.currency else f"{bucket.tokens} tokens"
                 for bucket in self.buckets()]
        if self.requests is not None:
            parts.append(f"{self.requests} requests")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Budget:
    """One LLMTokenRateLimit object, compiled."""

    name: str  # "namespace/name"
    key_header: str  # lower case; "" when the key is not a header (or there is none: one budget for everyone)
    rules: tuple[BudgetRule, ...]
    watched: frozenset[str]  # header names the rules and the key read
    key_caller: str = ""  # "namespace", "serviceAccount" or "workload": keyed by the verified caller

    def key_of(self, values: Mapping[str, str], caller: Caller | None) -> str | None:
        """The value this request counts under: its key header's, or its caller's; "" without a
        key. None: keyed by a caller whose workload is not known right now (fail closed)."""
        if self.key_caller:
            return caller_key(self.key_caller, caller) if caller is not None else ""
        return values.get(self.key_header, "") if self.key_header else ""

    def key_source(self) -> str:
        if self.key_caller:
            return f"the caller's {self.key_caller}"
        return f"header {self.key_header}" if self.key_header else "no key: one budget for all"

    def select(self, headers: Mapping[str, str]) -> BudgetRule | None:
        """The first rule that matches; None means the request is not limited by this object."""
        for rule in self.rules:
            if rule.applies(headers):
                return rule
        return None


@dataclass(frozen=True)
class BudgetTable:
    """The budgets of a config: by the route name a request is routed by, and each bucket's rule
    by (object, rule) for charging: token buckets' in `rules`, cost buckets' in `cost_rules`."""

    by_route: Mapping[str, tuple[Budget, ...]] = field(default_factory=dict)
    rules: Mapping[tuple[str, str], BudgetRule] = field(default_factory=dict)
    cost_rules: Mapping[tuple[str, str], BudgetRule] = field(default_factory=dict)

    @staticmethod
    def of(pairs: list[tuple[str, Budget]]) -> BudgetTable:
        by_route: dict[str, tuple[Budget, ...]] = {}
        rules: dict[tuple[str, str], BudgetRule] = {}
        cost_rules: dict[tuple[str, str], BudgetRule] = {}
        for route, budget in pairs:
            by_route[route] = (*by_route.get(route, ()), budget)
            for rule in budget.rules:
                for bucket in rule.buckets():
                    (cost_rules if bucket.currency else rules)[(budget.name, rule.name)] = bucket
        return BudgetTable(by_route, rules, cost_rules)

    def rule_for(self, bucket: str) -> BudgetRule | None:
        """The rule a bucket is kept by (its object and rule in the config in force), or None."""
        parsed = parse_bucket_id(bucket)
        if parsed is None:
            return None
        return (self.cost_rules if is_cost_bucket(bucket) else self.rules).get((parsed[0], parsed[1]))

    def has_cost(self) -> bool:
        """Whether a rule caps cost (its answers then carry the x-ratelimit-*-cost headers)."""
        return bool(self.cost_rules)


EMPTY_BUDGETS = BudgetTable()


@lru_cache(maxsize=65536)
def key_hash(value: str) -> str:
    """The key value as it may appear in logs, metadata and Redis: never raw."""
    return hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def bucket_id(budget: str, rule: str, hashed_key: str, cost: bool = False) -> str:
    """The bucket's name, also its Redis key. The rule name (free text) comes last. A cost
    bucket has a prefix of its own: its amounts are money, never added to tokens."""
    return f"{COST_BUCKET_PREFIX if cost else BUCKET_PREFIX}:{budget}:{hashed_key}:{rule}"


def bucket_of(budget: str, rule: BudgetRule, hashed_key: str) -> str:
    """The bucket of `rule` (a token or a cost bucket) for a key."""
    return bucket_id(budget, rule.name, hashed_key, bool(rule.currency))


def parse_bucket_id(bucket: str) -> tuple[str, str, str] | None:
    """(object, rule, key hash) of a bucket name (a token or a cost bucket), or None if it is not one."""
    parts = bucket.split(":", 4)
    if len(parts) != 5 or f"{parts[0]}:{parts[1]}" not in (BUCKET_PREFIX, COST_BUCKET_PREFIX):
        return None
    return parts[2], parts[4], parts[3]


def is_cost_bucket(bucket: str) -> bool:
    return bucket.startswith(COST_BUCKET_PREFIX + ":")


def drained(used: float, rate: float, elapsed_s: float) -> float:
    """What is still used after `elapsed_s` of draining at `rate` per second (never below zero)."""
    return max(0.0, used - rate * max(0.0, elapsed_s))


@dataclass(slots=True)  # not frozen: built per request, and a frozen dataclass costs microseconds to build
class Admission:
    """The answer for one bucket: admitted or not, and what the client is told."""

    allowed: bool
    reason: str  # "" when allowed, else "tokens", "cost" or "requests"
    retry_after_s: int  # whole seconds until a refused request would pass (0 when allowed)
    headers: tuple[tuple[str, str], ...]  # OpenAI's x-ratelimit-* headers (ours for cost)
    remaining_tokens: int  # what is left: tokens, or micro-units for a cost bucket
    cost: bool = False  # the answer of a cost bucket


def admission(rule: BudgetRule, used_tokens: float, used_requests: float) -> Admission:
    """Whether a request may go now, given what its bucket has used (already drained to now).
    For a cost bucket, "tokens" are pico-units of its currency throughout."""
    tokens_ok = used_tokens < rule.tokens
    requests_ok = rule.requests is None or used_requests + 1 <= rule.requests + 1e-9
    allowed = tokens_ok and requests_ok
    waits: list[tuple[float, str]] = []
    if not tokens_ok:  # until the bucket is above zero (strictly: exactly zero still refuses)
        waits.append((math.floor((used_tokens - rule.tokens) / rule.token_rate + 1e-9) + 1,
                      "cost" if rule.currency else "tokens"))
    if not requests_ok:  # until one more request fits
        assert rule.requests is not None
        waits.append((math.ceil((used_requests + 1 - rule.requests) / rule.request_rate - 1e-9), "requests"))
    wait, reason = max(waits) if waits else (0, "")
    retry_after = 0 if allowed else max(1, int(wait))
    if rule.currency:  # a cost bucket: amounts of its currency, what is left to the micro-unit (rounded down)
        remaining_tokens = max(0, math.floor((rule.tokens - used_tokens) / MICRO))
        headers = [
            ("x-ratelimit-limit-cost", format_amount(rule.tokens)),
            ("x-ratelimit-remaining-cost", format_amount(remaining_tokens * MICRO)),
            ("x-ratelimit-reset-cost", openai_duration(used_tokens / rule.token_rate)),
        ]
    else:
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
    return Admission(allowed, reason, retry_after, tuple(headers), remaining_tokens, bool(rule.currency))


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
    """The answer the client is told about when several buckets limit one request: a refusal
    (the longest wait) before an admission (the fewest tokens left; a token bucket's before a
    cost bucket's, whose tightest the client is told about beside it: `tightest_cost`)."""
    refused = [a for a in answers if not a.allowed]
    if refused:
        return max(refused, key=lambda a: a.retry_after_s)
    return min(answers, key=lambda a: (a.cost, a.remaining_tokens))


def tightest_cost(answers: list[Admission], head: Admission) -> Admission | None:
    """The admitted cost bucket with the least left, where the head (`most_restrictive`) is a
    token bucket's: its x-ratelimit-*-cost headers go to the client beside the head's."""
    if head.cost or not head.allowed:
        return None
    costs = [a for a in answers if a.cost]
    return min(costs, key=lambda a: a.remaining_tokens) if costs else None


# metadata keys (namespace `llm_gateway`) the ext_proc writes for Envoy's response headers
HEADER_METADATA = {
    "x-ratelimit-limit-tokens": "ratelimit_limit_tokens",
    "x-ratelimit-remaining-tokens": "ratelimit_remaining_tokens",
    "x-ratelimit-reset-tokens": "ratelimit_reset_tokens",
    "x-ratelimit-limit-requests": "ratelimit_limit_requests",
    "x-ratelimit-remaining-requests": "ratelimit_remaining_requests",
    "x-ratelimit-reset-requests": "ratelimit_reset_requests",
    # a rule's cost cap: our own headers, beside OpenAI's (amounts in the rule's currency)
    "x-ratelimit-limit-cost": "ratelimit_limit_cost",
    "x-ratelimit-remaining-cost": "ratelimit_remaining_cost",
    "x-ratelimit-reset-cost": "ratelimit_reset_cost",
}


class BudgetRefused(GatewayError):
    """A 429 with OpenAI's rate-limit error body and headers."""

    def __init__(self, budget: str, rule: str, answer: Admission):
        what = answer.reason if answer.reason in ("tokens", "cost") else "requests"
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
_COST_HEADERS = tuple(name for name in HEADER_METADATA if name.endswith("-cost"))


def response_headers(budgets: BudgetTable) -> frozenset[str]:
    """The x-ratelimit-* headers a config's admitted answers can carry: none without budgets, the
    `-requests` ones only where a rule counts requests, the `-cost` ones only where a rule caps
    cost, the `-tokens` ones only where a rule caps tokens (Envoy formats each for every answer)."""
    if not has_budgets(budgets):
        return frozenset()
    every = [*budgets.rules.values(), *budgets.cost_rules.values()]
    counts_requests = any(rule.requests is not None for rule in every)
    return frozenset((_TOKEN_HEADERS if budgets.rules else ()) + (_COST_HEADERS if budgets.cost_rules else ())
                     + (_REQUEST_HEADERS if counts_requests else ()))


def caller_unknown(budget: str) -> GatewayError:
    """A budget keyed by the caller's workload while that is not known (its pod not seen yet, or
    gone): never counted under another's bucket, refused."""
    return GatewayError(503, f"the caller's workload is not known right now, and budget {budget} counts by it: "
                             "try again shortly", "caller_unresolved", "server_error")


NOT_PRICED_CODE = "model_not_priced"


def unpriced_under_cap(currencies: tuple[str, ...], price: Price | None, model: str, provider_host: str,
                       budget: str) -> GatewayError | None:
    """A request under a cost cap (in `currencies`) whose model, at the provider an attempt goes
    to, has no price in that currency: refused (403), never let through uncharged. A cost cap
    cannot limit what it cannot price; the config check (`extproc.config.compile`) already
    refuses caps on routes whose providers have no price table."""
    if not currencies or (price is not None and all(c == price.currency for c in currencies)):
        return None
    return GatewayError(403, f"model {model!r} at {provider_host} has no price in {currencies[0]}, and budget {budget} "
                             f"caps what requests cost: ask for a priced model, or price it (LLMPriceTable)",
                        NOT_PRICED_CODE, "invalid_request_error")


def budget_unavailable() -> GatewayError:
    """--redis-fail-closed while the shared counts cannot be reached."""
    return GatewayError(503, "the rate-limit store is unreachable: limited requests are refused until it is back",
                        "rate_limit_unavailable", "server_error")


_FROM_A_PROVIDER = frozenset({"success", "provider_error", "client_cancelled"})


def is_charged(outcome: str) -> bool:
    """Whether a finished request's usage is charged at all: an answer that came from a provider,
    whatever became of it (an error answer or a stream cut after its usage was reported was
    billed by the provider: what it reported is charged, as `/spend` counts it); not the
    gateway's own answers, which carry no usage. The access log asks first, to read nothing more."""
    return outcome in _FROM_A_PROVIDER


def tokens_to_charge(outcome: str, total_tokens: float | None, prompt_tokens: float | None,
                     completion_tokens: float | None) -> int:
    """What a finished request costs its buckets: the usage its provider reported (the total, or
    prompt + completion); nothing for an answer without usage (nothing is estimated)."""
    if not is_charged(outcome):
        return 0
    if total_tokens is not None:
        return max(0, int(total_tokens))
    if prompt_tokens is not None or completion_tokens is not None:
        return max(0, int((prompt_tokens or 0) + (completion_tokens or 0)))
    return 0


def describe(table: BudgetTable, route: str, headers: Mapping[str, str], caller: Caller | None = None) -> list[str]:
    """For `extproc route`: which budget, rule and key a request would be charged to."""
    lines = []
    for budget in table.by_route.get(route, ()):
        rule = budget.select(headers)
        if rule is None:
            lines.append(f"budget {budget.name}: no rule matches: not limited")
            continue
        key = budget.key_of(headers, caller)
        shown = key_hash(key) if key is not None else "unknown"
        if budget.key_caller and key is not None:
            shown += f" = {key!r}"
        lines.append(f"budget {budget.name}: rule {rule.name}: {rule.describe_limits()} per {rule.per_s:g}s, "
                     f"key {shown} ({budget.key_source()})")
        if any(bucket.currency for bucket in rule.buckets()):
            lines.append(f"  cost: each answer priced by its provider's LLMPriceTable and charged when it ends; "
                         f"a model without a price in {rule.buckets()[-1].currency} is refused (403 model_not_priced)")
    return lines
