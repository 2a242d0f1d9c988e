"""Where budget counts live, and the two calls that use them: admission (the ext_proc, on the
request path) and charging (the access log, when an answer ends).

Every bucket's usage is kept in memory (`_mirror`: used tokens, used requests, when that was
true, from which used tokens memory is not trusted, the lease), drained locally as time passes.
Without Redis that is the whole story (one instance, exact). With Redis (every instance naming it
shares every bucket; its scripts and connection: `extproc.policy.budget_redis`):

- **Far from its limit**, a bucket this instance follows is admitted from memory, as in process.
  What this instance adds (tokens charged) is applied to the mirror at once and owed; every
  `sync_interval` a background task sends what is owed and reads back every bucket followed, in
  one pipelined round trip, so other instances' spending shows up here within one sync. Where
  the rule counts requests, a request admitted from memory is taken from this instance's lease:
  requests Redis counted for it when it granted them (at each sync, after its pace: see
  `lease_wanted`), so requests are exact across instances.
- **A bucket this instance does not follow** (new to it, or forgotten after `forget_s` unused),
  **a bucket near its token limit** (what is left is within what the instances could charge
  before this one hears from Redis again: see `near_level`), and a request that finds no lease
  left are admitted by Redis: the request waits (`Waiting`) for one round trip whose script
  admits it and counts it atomically. Requests of the same buckets waiting at once go in one
  script call; a round trip carries every request waiting. A request memory refuses is refused
  at once (memory never knows of more spending than Redis counts).

Redis unreachable: the mirror keeps limiting per instance and what is owed is kept (fail open);
the outage is logged once, counted, and `/readyz` says degraded. With `fail_closed`, requests a
budget applies to get a 503 until Redis answers again. A request that waited for Redis longer
than `ADMISSION_TIMEOUT_S` is decided the same way. Each sync tries again, so Redis coming back
resumes sharing without a restart, and the instances put back what they remember of each bucket
(a Redis that restarted empty).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import protobuf_wire as wire
from ..errors import GatewayError
from ..telemetry import fast_series as series
from ..telemetry.fast_series import CounterSeries
from .budget_redis import Call, RedisLink, number
from .budgets import (
    HEADER_METADATA,
    Admission,
    Budget,
    BudgetRefused,
    BudgetRule,
    BudgetTable,
    admission,
    bucket_id,
    budget_unavailable,
    caller_unknown,
    drained,
    has_budgets,
    key_hash,
    most_restrictive,
    parse_bucket_id,
)
from .caller import Caller, caller_key
from .table import RoutingTable

log = logging.getLogger(__name__)

SYNC_INTERVAL_S = 0.1
ACTIVE_S = 60.0  # a bucket untouched this long is forgotten (LLM_GATEWAY_BUDGET_FORGET, in seconds, changes it)
REDIS_TIMEOUT_S = 0.5  # one round trip, connecting included
ADMISSION_TIMEOUT_S = 0.5  # the longest a request waits for Redis; then fail open (memory) or closed (503)
# Near its limit (see near_level): what is left is within NEAR_ANSWERS times the largest charge seen for
# the bucket or its rule (one access-log batch's worth), or NEAR_GROWTH times the tokens all instances
# charged to the bucket per sync interval lately (decaying by GROWTH_DECAY per sync).
NEAR_ANSWERS = 2
NEAR_GROWTH = 2.0
GROWTH_DECAY = 0.95
_NEVER = math.inf  # a near level: memory is always trusted (in process)
_ALWAYS = -math.inf  # a near level: Redis decides (shared, before the bucket's growth is known)


def forget_after() -> float:
    """How long an instance follows a bucket it no longer uses (LLM_GATEWAY_BUDGET_FORGET seconds,
    default 60): after that its next request is admitted by Redis again."""
    value = os.environ.get("LLM_GATEWAY_BUDGET_FORGET")
    try:
        return float(value) if value else ACTIVE_S
    except ValueError:
        raise ValueError(f"LLM_GATEWAY_BUDGET_FORGET must be a number of seconds (got {value!r})") from None


def near_level(rule: BudgetRule, token_growth: float, answer_tokens: float) -> float:
    """From which used tokens a bucket's admissions go to Redis rather than memory: where what is
    left is within what the instances could charge before this one next hears from Redis. That
    is a few answers' worth (`answer_tokens`: the largest charge seen at once; memory lags the
    other instances' charges by one sync), or twice what all instances charged to the bucket in
    one sync interval lately (`token_growth`), so a busy key goes to Redis sooner. While no
    answer of the bucket or its rule was charged yet, a few answers' worth is unknown: Redis
    decides. (Requests need no level: those admitted from memory come from a lease Redis
    counted when it granted it.)"""
    if answer_tokens <= 0:
        return _ALWAYS
    return rule.tokens - max(NEAR_ANSWERS * answer_tokens, NEAR_GROWTH * token_growth)


def lease_wanted(served: float) -> int:
    """The lease an instance asks for, for its next sync interval: twice the requests of the
    bucket it admitted lately (`served`: those since the last sync, plus half the count before,
    so a short gap does not send every request to Redis; none once it has seen none for a few
    syncs: what it holds goes back)."""
    return 2 * math.floor(served + 0.5)


class BudgetMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.refused = series.Counter("llm_gateway_budget_refused",
                                      "Requests refused by a budget (reason: tokens, requests, unavailable, "
                                      "caller_unresolved)",
                                      ("budget", "rule", "reason"), registry=registry)
        self.charged = series.Counter("llm_gateway_budget_tokens_charged", "Tokens charged to budgets",
                               ("budget", "rule"), registry=registry)
        self.redis_errors = Counter("llm_gateway_budget_redis_errors", "Failed syncs with Redis", registry=registry)
        self.redis_seconds = Histogram("llm_gateway_budget_redis_sync_seconds", "Time of one sync with Redis "
                                       "(one pipelined round trip)", registry=registry,
                                       buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.redis_up = Gauge("llm_gateway_budget_redis_up", "1 while Redis answers (or no Redis is configured), "
                              "0 during an outage", registry=registry)
        self.syncs = Counter("llm_gateway_budget_syncs", "Successful syncs with Redis", registry=registry)
        self.redis_admissions = Counter("llm_gateway_budget_redis_admissions", "Requests admitted by a Redis "
                                        "round trip (reason: new, a bucket this instance did not follow; near, "
                                        "near its limit)", ("reason",), registry=registry)
        self.admission_round_trips = Counter("llm_gateway_budget_admission_round_trips", "Redis round trips "
                                             "made for waiting requests (one carries all of them)",
                                             registry=registry)
        self.admission_fallbacks = Counter("llm_gateway_budget_admission_fallbacks", "Waiting requests decided "
                                           "without Redis (reason: timeout, unreachable): fail open or closed",
                                           ("reason",), registry=registry)
        self.admission_wait = Histogram("llm_gateway_budget_admission_wait_seconds", "How long a request waited "
                                        "for its admission by Redis", registry=registry,
                                        buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0))
        self.redis_up.set(1)
        self._charged: dict[tuple[str, str], CounterSeries] = {}  # labelled series, looked up once

    def charged_series(self, budget: str, rule: str) -> CounterSeries:
        series = self._charged.get((budget, rule))
        if series is None:
            series = self._charged[(budget, rule)] = self.charged.labels(budget, rule)
        return series


_LIMIT_HEADERS = frozenset({"x-ratelimit-limit-tokens", "x-ratelimit-limit-requests"})
_CACHE_MAX = 16384  # entries per cache below (a few hundred bytes each); past it the cache starts again


def _identity(budget: str, rule: str, key: str, answer: Admission, buckets: list[str]) -> bytes:
    """The metadata entries that are the same for every admission to the same buckets: the
    budget, rule and hashed key for the access log, the buckets to charge (where several), the
    limits."""
    parts = [wire.string_entry("budget", budget), wire.string_entry("budget_rule", rule),
             wire.string_entry("budget_key", key)]
    parts += [wire.string_entry(HEADER_METADATA[name], value) for name, value in answer.headers
              if name in _LIMIT_HEADERS]
    if len(buckets) > 1:  # one bucket is named by the three fields above
        parts.append(wire.struct_entry("budget_buckets", wire.list_value([wire.string_value(b) for b in buckets])))
    return b"".join(parts)


def _numbers(answer: Admission) -> bytes:
    """The metadata entries that change with the bucket's level: what remains, when it resets."""
    return b"".join([wire.string_entry(HEADER_METADATA[name], value)
                     for name, value in answer.headers if name not in _LIMIT_HEADERS])


class Admitted:
    """An admission, for the request's `llm_gateway` dynamic metadata: the budget, rule and hashed
    key for the access log, the buckets to charge, the x-ratelimit-* header values."""

    __slots__ = ("budget", "rule", "key", "answer", "buckets", "_identity", "_numbers")

    def __init__(self, budget: str, rule: str, key: str, answer: Admission, buckets: list[str],
                 identity: bytes | None = None, numbers: bytes | None = None):
        self.budget, self.rule, self.key, self.answer, self.buckets = budget, rule, key, answer, buckets
        self._identity, self._numbers = identity, numbers  # both cached by the gate on the request path

    def encoded(self) -> bytes:
        """The entries in wire form, to append to the namespace's Struct (`extproc.protobuf_wire`)."""
        identity = self._identity
        if identity is None:
            identity = self._identity = _identity(self.budget, self.rule, self.key, self.answer, self.buckets)
        numbers = self._numbers
        if numbers is None:
            numbers = self._numbers = _numbers(self.answer)
        return identity + numbers

    def as_dict(self) -> dict[str, object]:
        """The same, as plain values (tests, `extproc route`)."""
        out: dict[str, object] = {"budget": self.budget, "budget_rule": self.rule, "budget_key": self.key}
        if len(self.buckets) > 1:
            out["budget_buckets"] = list(self.buckets)
        for name, value in self.answer.headers:
            out[HEADER_METADATA[name]] = value
        return out


def _duration_key(seconds: float) -> int:
    """A number that is the same exactly when `openai_duration(seconds)` is."""
    if seconds <= 0:
        return 0
    if seconds < 1:
        return -math.ceil(seconds * 1000)
    return math.ceil(seconds - 1e-9)


AnswerKey = tuple[int, int, int] | tuple[int, int, int, int, int]


def answer_key(rule: BudgetRule, used_tokens: float, used_requests: float) -> AnswerKey | None:
    """What an admission's answer depends on, where it admits: two levels of one rule with the
    same key get the same answer and headers (so it is computed once). None where it refuses.
    The rule is named by its identity: keys are kept only while the table holding it is in force."""
    if used_tokens >= rule.tokens:
        return None
    if rule.requests is None:  # the rule by identity: hashing a rule's fields would cost more than the rest
        return id(rule), math.floor(rule.tokens - used_tokens), _duration_key(used_tokens / rule.token_rate)
    after = used_requests + 1
    if after > rule.requests + 1e-9:
        return None
    return (id(rule), math.floor(rule.tokens - used_tokens), _duration_key(used_tokens / rule.token_rate),
            math.floor(rule.requests - after + 1e-9), _duration_key(after / rule.request_rate))


# Which rule and bucket a set of header values means, worked out once: (rule, hashed key, bucket,
# the bucket's identity entries, the rule's drain rates), or _NO_RULE.
Decided = tuple[BudgetRule, str, str, bytes, tuple[float, float]]
Decision = Decided | tuple[()]
_NO_RULE: tuple[()] = ()  # a decision: no rule of the object matches


class Waiting:
    """A request whose budgets a Redis round trip decides. `then(done)`: `done` is called once,
    from the event loop, with what `BudgetGate.admit` would have given: the `Admitted` (or None),
    or the error the request gets (429, 503)."""

    __slots__ = ("since", "settled", "_done", "_outcome")

    def __init__(self, since: float):
        self.since = since
        self.settled = False
        self._done: Callable[[Admitted | GatewayError | None], None] | None = None
        self._outcome: Admitted | GatewayError | None = None

    def then(self, done: Callable[[Admitted | GatewayError | None], None]) -> None:
        if self.settled:
            done(self._outcome)
        else:
            self._done = done

    def settle(self, outcome: Admitted | GatewayError | None) -> None:
        if self.settled:
            return
        self.settled, self._outcome = True, outcome
        done, self._done = self._done, None
        if done is not None:
            try:
                done(outcome)
            except Exception:  # the waiting request's own failure; the others still get theirs
                log.exception("a request waiting for its budget failed")


class _Ask:
    """Requests of the same buckets waiting for one Redis round trip: one script call for all."""

    __slots__ = ("chosen", "buckets", "waiting", "since", "sent", "fell_back")

    def __init__(self, chosen: list[tuple[Budget, Decided]], buckets: tuple[str, ...], since: float):
        self.chosen = chosen
        self.buckets = buckets
        self.waiting: list[Waiting] = []
        self.since = since  # when the first of them started waiting
        self.sent: list[Waiting] = []  # those the round trip on its way asks for, in its order
        self.fell_back = 0  # of those, admitted from memory after waiting too long


Chosen = list[tuple[Budget, Decided]]


class BudgetGate:
    """Admission and charging for every budget of the table in force."""

    def __init__(self, registry: CollectorRegistry, table: Callable[[], RoutingTable],
                 redis_url: str | None = None, fail_closed: bool = False,
                 clock: Callable[[], float] = time.monotonic, sync_interval: float = SYNC_INTERVAL_S,
                 forget_s: float | None = None):
        self._table = table  # the routing table in force (its `.budgets`)
        self._clock = clock
        self.metrics = BudgetMetrics(registry)
        self.redis_url = redis_url
        self.fail_closed = fail_closed
        self._sync_interval = sync_interval
        self._forget_s = forget_after() if forget_s is None else forget_s
        self._shared = redis_url is not None
        self._fresh = _ALWAYS if self._shared else _NEVER  # the near level of a bucket not read from Redis
        # bucket -> [used tokens, used requests, as of, near tokens (see near_level), lease (requests this
        # instance may admit from memory, counted in Redis and in `used requests`), requests served since
        # the last sync]; in process the near level is infinite and there are no leases
        self._mirror: dict[str, list[float]] = {}
        self._pending: dict[str, list[float]] = {}  # bucket -> [tokens, requests] not yet in Redis
        self._touched: dict[str, float] = {}  # bucket -> last admission or charge
        self._rates: dict[str, tuple[float, float]] = {}  # bucket -> drain rates of its rule
        # shared: bucket -> [tokens, Redis's time] of the last sync's reading, token growth per sync
        # interval, whether growth was measured yet, the bucket's largest charge
        self._readings: dict[str, list[float]] = {}
        self._charged_max: dict[tuple[str, str], float] = {}  # (object, rule) -> largest charge to one bucket
        self._asks: dict[tuple[str, ...], _Ask] = {}  # waiting for the next round trip, by buckets
        self._sending: list[_Ask] = []  # on their way to Redis
        self._timer: asyncio.TimerHandle | None = None  # decides those who waited too long
        self._wake: asyncio.Event | None = None  # the Redis task: a request is waiting, or a sync is wanted
        self._sync_soon = False
        self._stopping = False
        self._link: RedisLink | None = None
        self._decided_for: object = None  # the table the caches below were worked out for
        # (object, header values and the caller's key) -> rule, bucket, ...
        self._decisions: dict[tuple[str, tuple[bytes | str | None, ...]], Decision] = {}
        self._answers: dict[AnswerKey, tuple[Admission, bytes | None]] = {}  # answer_key -> answer, its numbers
        self._identities: dict[tuple[str, ...], bytes] = {}  # several objects: head and buckets -> identity
        self.degraded = False
        self._task: asyncio.Task[None] | None = None

    def configured(self) -> bool:
        """Whether the table in force has any budget: without one, finished answers owe nothing."""
        return has_budgets(self._table().budgets)

    # -- the request path -------------------------------------------------------------------

    def admit(self, route: str, headers: Mapping[str, bytes], caller: Caller | None = None
              ) -> Admitted | Waiting | None:
        """`headers`: the request's, by name. None when no budget applies; else what to write into
        the request's metadata (budget, rule, hashed key, header values), or a `Waiting` where
        Redis decides (a bucket this instance does not follow, or one near its limit). Raises
        BudgetRefused (429) or a 503 (fail closed). Per request this is a bucket's level and a
        few dictionary lookups: which rule and bucket a set of header values means, and the
        answer for a level, are each worked out once (per table in force). `caller`: for budgets
        keyed by the caller."""
        table = self._table()
        objects = table.budgets.by_route.get(route)
        if not objects:
            return None
        if table is not self._decided_for:  # a new table: new rules, new answers
            self._decided_for = table
            self._decisions.clear()
            self._answers.clear()
            self._identities.clear()
        now = self._clock()
        if len(objects) == 1:  # the common case, without the lists the general one needs
            budget = objects[0]
            decision = self._decision(budget, headers, caller)
            if not decision:  # _NO_RULE
                return None
            rule, hashed, bucket, identity, rates = decision
            known = self._answer(budget, rule, bucket, now)
            if known is None:  # Redis decides
                return self._ask([(budget, decision)], now)
            answer, numbers = known
            if not answer.allowed:
                self.metrics.refused.labels(budget.name, rule.name, answer.reason).inc()
                raise BudgetRefused(budget.name, rule.name, answer)
            self._used(bucket, rule, rates, now)
            return Admitted(budget.name, rule.name, hashed, answer, [bucket], identity, numbers)
        chosen: Chosen = []
        for budget in objects:
            decision = self._decision(budget, headers, caller)
            if decision:  # not _NO_RULE
                chosen.append((budget, decision))
        if not chosen:
            return None
        admitted = self._admit_all(chosen, now)
        return self._ask(chosen, now) if admitted is None else admitted

    def _admit_all(self, chosen: Chosen, now: float) -> Admitted | None:
        """The admission of a request by every object in `chosen`, from memory; None where Redis
        must decide. Raises BudgetRefused or a 503 (fail closed)."""
        answered: list[tuple[Budget, Decided, Admission, bytes | None]] = []
        for budget, decision in chosen:
            known = self._answer(budget, decision[0], decision[2], now)
            if known is None:
                return None
            answered.append((budget, decision, *known))
        answer = most_restrictive([c[2] for c in answered])
        budget, (rule, hashed, _, _, _), _, numbers = next(c for c in answered if c[2] is answer)
        if not answer.allowed:
            self.metrics.refused.labels(budget.name, rule.name, answer.reason).inc()
            raise BudgetRefused(budget.name, rule.name, answer)
        for _, (rule_, _, bucket_, _, rates), _, _ in answered:
            self._used(bucket_, rule_, rates, now)
        buckets = [c[1][2] for c in answered]
        # the identity names every bucket (not the one kept for the head's bucket alone), and the
        # head's limits: kept per head and set of buckets, like the decisions
        named = (budget.name, rule.name, hashed, *buckets)
        known_identity = self._identities.get(named)
        if known_identity is None:
            if len(self._identities) > _CACHE_MAX:
                self._identities.clear()
            known_identity = self._identities[named] = _identity(budget.name, rule.name, hashed, answer, buckets)
        return Admitted(budget.name, rule.name, hashed, answer, buckets, known_identity, numbers)

    def _decision(self, budget: Budget, headers: Mapping[str, bytes], caller: Caller | None = None) -> Decision:
        """The kept decision for this request's values of the headers `budget` reads (and its
        caller's key, for a budget keyed by the caller)."""
        seen: tuple[bytes | str | None, ...] = tuple([headers.get(name) for name in budget.watched])  # one order
        if budget.key_caller:
            by = caller_key(budget.key_caller, caller) if caller is not None else ""
            if by is None:
                self.metrics.refused.labels(budget.name, "", "caller_unresolved").inc()
                raise caller_unknown(budget.name)
            seen = (*seen, by)
        decision = self._decisions.get((budget.name, seen))
        if decision is None:
            decision = self._decide(budget, {name: value.decode("latin-1") for name, value in
                                             zip(budget.watched, seen, strict=False) if isinstance(value, bytes)},
                                    seen, caller)
        return decision

    def _answer(self, budget: Budget, rule: BudgetRule, bucket: str,
                now: float) -> tuple[Admission, bytes | None] | None:
        """The answer for the bucket's level now, and its encoded numbers (None for a refusal); None
        where Redis must decide (shared, Redis answering: a bucket not followed, or near its limit
        where memory would admit)."""
        if self.degraded and self.fail_closed:
            self.metrics.refused.labels(budget.name, rule.name, "unavailable").inc()
            raise budget_unavailable()
        state = self._mirror.get(bucket)
        if state is None:
            if self._shared and not self.degraded:
                return None  # not followed here: Redis knows
            used_tokens = used_requests = 0.0
        else:
            elapsed = now - state[2]
            used_tokens = drained(state[0], rule.token_rate, elapsed)
            used_requests = drained(state[1], rule.request_rate, elapsed)
            if self._shared:
                used_requests = max(0.0, used_requests - state[4])  # its own lease is not used yet
                if (used_tokens >= state[3] or (rule.requests is not None and state[4] < 1)) and \
                        not self.degraded and used_tokens < rule.tokens and \
                        (rule.requests is None or used_requests + 1 <= rule.requests + 1e-9):
                    # near its token limit, or no lease left, and memory would admit: Redis decides
                    # (memory refuses alone: it never knows of more spending than there is)
                    return None
        key = answer_key(rule, used_tokens, used_requests)
        known = self._answers.get(key) if key is not None else None
        if known is None:
            answer = admission(rule, used_tokens, used_requests)
            known = (answer, _numbers(answer) if answer.allowed else None)
            if key is not None:
                if len(self._answers) > _CACHE_MAX:
                    self._answers.clear()
                self._answers[key] = known
        return known

    def _used(self, bucket: str, rule: BudgetRule, rates: tuple[float, float], now: float) -> None:
        """An admitted request: counted where the rule counts requests (shared: taken from the
        lease, which Redis counted already); its bucket kept fresh."""
        if rule.requests is not None:
            if self._shared:
                state = self._mirror.get(bucket)
                if state is not None and state[4] >= 1:  # from the lease
                    state[4] -= 1
                    state[5] += 1
                    self._touched[bucket] = now
                    self._rates[bucket] = rates
                    return
            self._add(bucket, rule, 0.0, 1.0, now)  # in process, or Redis unreachable: owed
            if self._shared:
                self._mirror[bucket][5] += 1
        else:  # refreshed from Redis while in use, drained at its rule's rates
            self._touched[bucket] = now
            self._rates[bucket] = rates

    def _decide(self, budget: Budget, values: dict[str, str], seen: tuple[bytes | str | None, ...],
                caller: Caller | None = None) -> Decision:
        """Which rule of `budget` these header values match, and its bucket: (rule, hashed key,
        bucket, the bucket's identity entries, the rule's drain rates), or _NO_RULE. Kept for the
        table in force."""
        rule = budget.select(values)
        if rule is None:
            decision: Decision = _NO_RULE
        else:
            hashed = key_hash(budget.key_of(values, caller) or "")
            bucket = bucket_id(budget.name, rule.name, hashed)
            limits = admission(rule, 0.0, 0.0)  # only its limit headers are read
            decision = (rule, hashed, bucket, _identity(budget.name, rule.name, hashed, limits, [bucket]),
                        (rule.token_rate, rule.request_rate))
        if len(self._decisions) > _CACHE_MAX:
            self._decisions.clear()
        self._decisions[(budget.name, seen)] = decision
        return decision

    def _usage(self, bucket: str, rule: BudgetRule, now: float) -> tuple[float, float]:
        state = self._mirror.get(bucket)
        if state is None:
            return 0.0, 0.0
        elapsed = now - state[2]
        return drained(state[0], rule.token_rate, elapsed), drained(state[1], rule.request_rate, elapsed)

    def _add(self, bucket: str, rule: BudgetRule, tokens: float, requests: float, now: float) -> None:
        state = self._mirror.get(bucket)
        if state is None:
            self._mirror[bucket] = [tokens, requests, now, self._fresh, 0.0, 0.0]
        else:
            elapsed = now - state[2]
            state[0] = drained(state[0], rule.token_rate, elapsed) + tokens
            state[1] = drained(state[1], rule.request_rate, elapsed) + requests
            state[2] = now
        self._touched[bucket] = now
        self._rates[bucket] = (rule.token_rate, rule.request_rate)
        if self._shared:
            owed = self._pending.get(bucket)
            if owed is None:
                self._pending[bucket] = [tokens, requests]
            else:
                owed[0] += tokens
                owed[1] += requests

    # -- waiting for Redis -------------------------------------------------------------------

    def _ask(self, chosen: Chosen, now: float) -> Waiting:
        """A request for the next round trip: with those of the same buckets, one script call."""
        buckets = tuple([decision[2] for _, decision in chosen])
        ask = self._asks.get(buckets)
        if ask is None:
            ask = self._asks[buckets] = _Ask(chosen, buckets, now)
            if self._wake is not None:
                self._wake.set()
            if self._timer is None:
                self._arm_timer()
        waiting = Waiting(now)
        ask.waiting.append(waiting)
        new = any(bucket not in self._readings for bucket in buckets)
        self.metrics.redis_admissions.labels("new" if new else "near").inc()
        return waiting

    def _arm_timer(self, delay: float | None = None) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (a test driving the gate by hand): round trips decide
            return
        self._timer = loop.call_later(ADMISSION_TIMEOUT_S if delay is None else delay, self._expire)

    def _expire(self) -> None:
        """Requests that waited ADMISSION_TIMEOUT_S for Redis: decided without it (fail open:
        memory; fail closed: 503). A round trip still on its way is still applied when it comes."""
        self._timer = None
        too_old = self._clock() - ADMISSION_TIMEOUT_S
        for buckets, ask in list(self._asks.items()):
            if ask.since <= too_old:
                del self._asks[buckets]
                self._fall_back(ask, ask.waiting, "timeout", count=True)
        for ask in self._sending:
            if ask.since <= too_old:
                ask.fell_back += self._fall_back(ask, ask.sent, "timeout", count=False)
        still = [ask.since for ask in self._asks.values()]
        still += [ask.since for ask in self._sending if any(not w.settled for w in ask.sent)]
        if still:  # again when the first of those still waiting has waited its time
            self._arm_timer(max(0.001, min(still) + ADMISSION_TIMEOUT_S - self._clock()))

    def _fall_back(self, ask: _Ask, waiting: list[Waiting], reason: str, count: bool) -> int:
        """Decides waiting requests without Redis, as while it is unreachable; how many were admitted.
        `count`: counted here (False while their round trip may still count them in Redis)."""
        admitted = 0
        now = self._clock()
        for one in waiting:
            if one.settled:
                continue
            self.metrics.admission_fallbacks.labels(reason).inc()
            outcome: Admitted | GatewayError | None
            if self.fail_closed:
                budget, decision = ask.chosen[0]
                self.metrics.refused.labels(budget.name, decision[0].name, "unavailable").inc()
                outcome = budget_unavailable()
            else:
                levels = []
                for _, (rule, _, bucket, _, _) in ask.chosen:
                    tokens, requests = self._usage(bucket, rule, now)
                    state = self._mirror.get(bucket)
                    levels.append((tokens, max(0.0, requests - state[4]) if state is not None else requests))
                try:
                    outcome = self._conclude(ask.chosen, levels, None)
                except GatewayError as error:
                    outcome = error
                else:
                    admitted += 1
                    if count:
                        for _, (rule, _, bucket, _, rates) in ask.chosen:
                            self._used(bucket, rule, rates, now)
            self._settled(one, outcome, now)
        return admitted

    def _settled(self, waiting: Waiting, outcome: Admitted | GatewayError | None, now: float) -> None:
        self.metrics.admission_wait.observe(max(0.0, now - waiting.since))
        waiting.settle(outcome)

    def _conclude(self, chosen: Chosen, levels: list[tuple[float, float]], granted: bool | None) -> Admitted:
        """The admission of a request whose buckets are at `levels` (used tokens and requests,
        before it), as memory would decide it; `granted`: what Redis decided, which wins where
        rounding would say otherwise. Raises BudgetRefused."""
        answers = [admission(decision[0], tokens, requests) for (_, decision), (tokens, requests)
                   in zip(chosen, levels, strict=True)]
        if granted is False and all(a.allowed for a in answers):  # Redis counted no room: refused, as requests
            answers = [admission(decision[0], tokens, max(requests, decision[0].requests or 0))
                       for (_, decision), (tokens, requests) in zip(chosen, levels, strict=True)]
        answer = answers[0] if len(answers) == 1 else most_restrictive(answers)
        budget, (rule, hashed, bucket, identity, _) = chosen[next(i for i, a in enumerate(answers) if a is answer)]
        if granted and not answer.allowed:
            answer = Admission(True, "", 0, answer.headers, answer.remaining_tokens)
        if not answer.allowed:
            self.metrics.refused.labels(budget.name, rule.name, answer.reason).inc()
            raise BudgetRefused(budget.name, rule.name, answer)
        if len(chosen) == 1:
            return Admitted(budget.name, rule.name, hashed, answer, [bucket], identity)
        return Admitted(budget.name, rule.name, hashed, answer, [decision[2] for _, decision in chosen])

    # -- the end of an answer (access log) ------------------------------------------------

    def charge(self, buckets: Iterable[str], tokens: int) -> None:
        """Take a finished answer's tokens off each of its buckets (rules of the config in force;
        a bucket whose object or rule is gone is skipped). Shared, a charge that brings a bucket
        near its limit is sent at once rather than at the next sync."""
        if tokens <= 0:
            return
        budgets: BudgetTable = self._table().budgets
        now = self._clock()
        for bucket in buckets:
            parsed = parse_bucket_id(bucket)
            if parsed is None:
                continue
            rule_key = (parsed[0], parsed[1])
            rule = budgets.rules.get(rule_key)
            if rule is None:
                continue
            self._add(bucket, rule, float(tokens), 0.0, now)
            self.metrics.charged_series(rule_key[0], rule_key[1]).inc(tokens)
            if self._shared:
                if tokens > self._charged_max.get(rule_key, 0.0):
                    self._charged_max[rule_key] = float(tokens)
                state = self._mirror[bucket]
                if state[0] >= state[3] and not self._sync_soon:
                    self._sync_soon = True
                    if self._wake is not None:
                        self._wake.set()

    # -- Redis --------------------------------------------------------------------------------

    def degraded_reason(self) -> str | None:
        if self.degraded:
            mode = "limited requests get 503" if self.fail_closed else "budgets are kept per instance"
            return f"Redis unreachable ({mode})"
        return None

    async def start(self) -> None:
        if self.redis_url is None:
            self._task = asyncio.create_task(self._forget_loop())
            return
        self._link = RedisLink(self.redis_url, REDIS_TIMEOUT_S)
        self._task = asyncio.create_task(self._redis_loop())

    async def stop(self) -> None:
        self._stopping = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait({self._task}, timeout=REDIS_TIMEOUT_S * 2)  # never waits on a task gone astray
            if self._task.done() and not self._task.cancelled():
                self._task.exception()  # retrieved: nothing to report at the end
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for ask in [*self._asks.values(), *self._sending]:  # nobody is left waiting
            self._fall_back(ask, ask.waiting, "unreachable", count=True)
        self._asks.clear()
        self._sending = []
        if self._link is not None:
            if not self.degraded:  # what is owed sent, leases given back: other instances may use them now
                await self._round_trip([], True, final=True)
            try:
                await self._link.close()
            except Exception:
                pass
            self._link = None

    async def _forget_loop(self) -> None:
        """In process: a bucket drained to zero is the same as no bucket; forget it."""
        while True:
            await asyncio.sleep(10.0)
            self.forget_drained()

    def forget_drained(self) -> int:
        now = self._clock()
        gone = []
        for bucket, state in self._mirror.items():
            token_rate, request_rate = self._rates.get(bucket, (0.0, 0.0))
            elapsed = now - state[2]
            if drained(state[0], token_rate, elapsed) == 0 and drained(state[1], request_rate, elapsed) == 0:
                gone.append(bucket)
        for bucket in gone:
            self._mirror.pop(bucket, None)
            self._rates.pop(bucket, None)
            self._touched.pop(bucket, None)
        return len(gone)

    async def _redis_loop(self) -> None:
        """The one sender to Redis: a round trip as soon as a request waits (it carries every
        request waiting then), and a sync every sync interval (sooner when a charge brings a bucket
        near its limit). Round trips never overlap, so answers apply in Redis's order."""
        wake = self._wake = asyncio.Event()
        loop = asyncio.get_running_loop()
        next_sync = loop.time()
        while not self._stopping:
            delay = next_sync - loop.time()
            if delay > 0 and not self._asks and not self._sync_soon:
                # a timer rather than wait_for or asyncio.timeout: in Python 3.11 either can swallow the
                # task's cancellation when it comes as the time is up
                timer = loop.call_later(delay, wake.set)
                try:
                    await wake.wait()
                finally:
                    timer.cancel()
            wake.clear()
            if self._stopping:
                return
            sync = self._sync_soon or loop.time() >= next_sync
            if sync:
                self._sync_soon = False
                next_sync = loop.time() + self._sync_interval
            asks = list(self._asks.values())
            self._asks.clear()
            try:
                await self._round_trip(asks, sync)
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug must not end sharing: the next round trip tries again
                log.exception("budget round trip with Redis failed")
                await asyncio.sleep(self._sync_interval)

    async def sync(self) -> bool:
        """One round trip now: every waiting request, what is owed, every bucket followed read back.
        False on failure."""
        asks = list(self._asks.values())
        self._asks.clear()
        return await self._round_trip(asks, True)

    def _forget(self, now: float) -> None:
        for bucket in [b for b, t in self._touched.items() if now - t > self._forget_s and b not in self._pending]:
            self._touched.pop(bucket, None)
            self._mirror.pop(bucket, None)
            self._rates.pop(bucket, None)
            self._readings.pop(bucket, None)

    async def _round_trip(self, asks: list[_Ask], sync: bool, final: bool = False) -> bool:
        """Waiting requests admitted by Redis (one script call per set of buckets), and, for a sync,
        what is owed sent, leases given back and granted, and every bucket followed read back: one
        pipelined round trip. `final`: every lease given back (the instance stops)."""
        now = self._clock()
        if sync:
            self._forget(now)
        sending: list[_Ask] = []
        for ask in asks:
            if self._answered_from_memory(ask, now):  # read meanwhile, far from its limit: as any request
                continue
            ask.sent = [one for one in ask.waiting if not one.settled]
            sending.append(ask)
        calls: list[Call] = []
        sent: dict[str, list[float]] = {}  # bucket -> what was owed and the lease given back, now sent
        for ask in sending:
            args = [str(len(ask.sent))]
            for _, (rule, _, bucket, _, rates) in ask.chosen:
                state = self._mirror.get(bucket)
                wanted = lease_wanted((state[5] if state is not None else 0.0) + len(ask.sent))
                # its lease given back first: Redis decides on what every other instance holds, and
                # grants it a new one after
                args += self._bucket_args(bucket, rule, rates, now, 0, wanted, sent)
            calls.append(Call("admit", ask.buckets, args))
        synced: list[tuple[str, BudgetRule | None, tuple[float, float]]] = []
        if sync:
            rules = self._table().budgets.rules
            for bucket in self._touched:
                if bucket in sent:
                    continue
                its_rule = rules.get(_rule_key(bucket))
                rates = self._rates.get(bucket, (1.0, 1.0))
                state = self._mirror.get(bucket)
                wanted = 0
                if state is not None:
                    wanted = 0 if final else lease_wanted(state[5])
                    state[5] /= 2  # what it served lately fades
                calls.append(Call("sync", (bucket,), self._bucket_args(bucket, its_rule, rates, now, wanted, wanted,
                                                                       sent)))
                synced.append((bucket, its_rule, rates))
        elif not sending:
            return True
        if sending:
            self.metrics.admission_round_trips.inc()
        self._sending = sending
        started = time.perf_counter()
        try:
            assert self._link is not None  # started with a Redis URL
            answers = await self._link.round_trip(calls)
        except Exception as exc:  # the connection, a timeout, a script error: all mean "not now"
            self._sending = []
            self._failed(exc, sent, sending)
            return False
        self._sending = []
        self.metrics.redis_seconds.observe(time.perf_counter() - started)
        for ask, answer in zip(sending, answers, strict=False):
            self._admitted_by_redis(ask, answer, now)
        for (bucket, its_rule, rates), answer in zip(synced, answers[len(sending):], strict=True):
            tokens, requests, redis_now, big = (float(v) for v in answer[:4])
            self._read(bucket, its_rule, rates, tokens, requests, redis_now, big, float(answer[4]), now, True)
        if self.degraded:
            log.warning("Redis at %s is back: budgets are shared again", redacted_url(self.redis_url))
        self._set_up(True)
        if sync:
            self.metrics.syncs.inc()
        return True

    def _bucket_args(self, bucket: str, rule: BudgetRule | None, rates: tuple[float, float], now: float,
                     keep: int, wanted: int, sent: dict[str, list[float]]) -> list[str]:
        """A bucket's values for a script (`budget_redis.BUCKET_ARGS`): what it owes is taken (sent),
        its lease past `keep` given back, and a lease of `wanted` asked for (what it keeps included)."""
        owed = self._pending.pop(bucket) if bucket in self._pending else [0.0, 0.0]
        state = self._mirror.get(bucket)
        floor_tokens = floor_requests = lease = back = 0.0
        if state is not None:
            elapsed = now - state[2]
            floor_tokens = drained(state[0], rates[0], elapsed)
            floor_requests = drained(state[1], rates[1], elapsed)
            lease = state[4]
            if lease > keep:
                back = lease - keep
                state[4] = lease = keep
            floor_requests = max(0.0, floor_requests - back)
        sent[bucket] = [owed[0], owed[1], back]
        counts = rule is not None and rule.requests is not None
        more = max(0, wanted - math.floor(lease)) if counts else 0
        return [number(rates[0]), number(rates[1]), number(owed[0]), number(owed[1]), number(floor_tokens),
                number(floor_requests), number(back), number(rule.tokens if rule is not None else 0),
                number((rule.requests or 0) if rule is not None else 0), str(more)]

    def _answered_from_memory(self, ask: _Ask, now: float) -> bool:
        """Before its round trip: whether memory can now decide the waiting requests (their buckets
        were read meanwhile and are far from their limits); if so they are decided here."""
        if not all(bucket in self._readings for bucket in ask.buckets):
            return False
        for one in ask.waiting:
            if one.settled:
                continue
            try:
                outcome: Admitted | GatewayError | None = self._admit_all(ask.chosen, now)
            except GatewayError as error:
                outcome = error
            if outcome is None:  # near its limit: Redis decides this one and the rest
                return False
            self._settled(one, outcome, now)
        return True

    def _admitted_by_redis(self, ask: _Ask, answer: list[Any], as_of: float) -> None:
        """A script's answer: `k` of the requests sent admitted (and counted in Redis), each
        bucket's level before them and the lease granted; the mirror takes the levels, the
        requests their answers."""
        admitted = int(answer[0])
        redis_now = float(answer[1])
        levels: list[tuple[float, float]] = []
        for i, (_, (rule, _, bucket, _, rates)) in enumerate(ask.chosen):
            tokens, requests, big, granted = (float(v) for v in answer[2 + 4 * i:6 + 4 * i])
            levels.append((tokens, requests))  # its own lease was given back first
            counted = requests + (admitted if rule.requests is not None else 0) + granted
            self._read(bucket, rule, rates, tokens, counted, redis_now, big, granted, as_of, False)
            self._touched[bucket] = as_of
        now = self._clock()
        for j, one in enumerate(ask.sent):
            if one.settled:  # decided already (waited too long): its place in Redis's count stays
                continue
            before = min(j, admitted)
            at = [(tokens, requests + before if decision[0].requests is not None else requests)
                  for (tokens, requests), (_, decision) in zip(levels, ask.chosen, strict=True)]
            try:
                outcome: Admitted | GatewayError | None = self._conclude(ask.chosen, at, j < admitted)
            except GatewayError as error:
                outcome = error
            else:
                for _, (rule, _, bucket, _, _) in ask.chosen:
                    if rule.requests is not None:
                        self._mirror[bucket][5] += 1  # served here: the lease it wants next follows
            self._settled(one, outcome, now)

    def _read(self, bucket: str, rule: BudgetRule | None, rates: tuple[float, float], tokens: float,
              requests: float, redis_now: float, big: float, granted: float, as_of: float, sync: bool) -> None:
        """A bucket's level read from Redis (at Redis's time `redis_now`, sent at `as_of`; `big`:
        the largest charge it was sent at once, by any instance; `granted`: the lease Redis just
        counted for this instance): the mirror takes it (plus what this instance added since it
        was sent) and, at a sync, how fast the bucket's tokens are spent lately, for its near
        level."""
        self._rates[bucket] = rates
        since = self._pending.get(bucket)
        state = self._mirror.get(bucket)
        lease = (state[4] if state is not None else 0.0) + granted
        served = state[5] if state is not None else 0.0
        seen = self._readings.get(bucket)
        if seen is None:
            seen = self._readings[bucket] = [tokens, redis_now, 0.0, 0.0, big]
        else:
            seen[4] = big
        if sync:
            elapsed = redis_now - seen[1]
            if elapsed >= self._sync_interval / 2:  # growth over at least half an interval: not a blip
                growth = max(0.0, tokens - drained(seen[0], rates[0], elapsed)) * self._sync_interval / elapsed
                seen[0], seen[1], seen[2], seen[3] = tokens, redis_now, max(growth, seen[2] * GROWTH_DECAY), 1.0
        if seen[3] and rule is not None:
            near_tokens = near_level(rule, seen[2], max(big, self._charged_max.get(_rule_key(bucket), 0.0)))
        else:  # growth not measured yet (a bucket just read for the first time): Redis decides
            near_tokens = _ALWAYS
        if since is not None:
            tokens, requests = tokens + since[0], requests + since[1]
        self._mirror[bucket] = [tokens, requests, as_of, near_tokens, lease, served]

    def _failed(self, exc: Exception, sent: dict[str, list[float]], sending: list[_Ask]) -> None:
        """A round trip that failed: what was owed is owed again (and leases given back are held
        again), the requests it carried are decided as while Redis is unreachable (fail open or
        closed), the outage is logged once."""
        for bucket, (tokens, requests, back) in sent.items():  # still owed: sent next time
            mine = self._pending.setdefault(bucket, [0.0, 0.0])
            mine[0] += tokens
            mine[1] += requests
            state = self._mirror.get(bucket)
            if state is not None:
                state[4] += back
        self.metrics.redis_errors.inc()
        if not self.degraded:
            log.warning("Redis at %s unreachable (%s): %s until it is back", redacted_url(self.redis_url),
                        type(exc).__name__, "limited requests get 503" if self.fail_closed
                        else "failing open, budgets kept per instance")
        self._set_up(False)
        now = self._clock()
        for ask in sending:
            for _ in range(ask.fell_back):  # admitted from memory while on their way: Redis never counted them
                for _, (rule, _, bucket, _, _) in ask.chosen:
                    if rule.requests is not None:
                        self._add(bucket, rule, 0.0, 1.0, now)
            self._fall_back(ask, ask.sent, "unreachable", count=True)

    def _set_up(self, up: bool) -> None:
        self.degraded = not up
        self.metrics.redis_up.set(1 if up else 0)


def _rule_key(bucket: str) -> tuple[str, str]:
    parsed = parse_bucket_id(bucket)
    return (parsed[0], parsed[1]) if parsed is not None else ("", "")


def redacted_url(url: str | None) -> str:
    """The URL without a password (redis://user:secret@host -> redis://user:***@host)."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
