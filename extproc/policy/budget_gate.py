"""Where budget counts live, and the two calls that use them: admission (the ext_proc, on the
request path) and charging (the access log, when an answer ends).

The request path never waits for Redis. Every bucket's usage is kept in memory (`_mirror`:
used tokens, used requests, and when that was true), drained locally as time passes. Without
Redis that is the whole story (one instance, exact). With Redis, what this instance adds
(requests admitted, tokens charged) is applied to the mirror at once and queued; a background
task sends the queue every `sync_interval` as one pipelined round trip (a Lua script per bucket:
drain by Redis's clock, add, set an expiry so idle buckets disappear) and replaces each active
bucket's mirror with what Redis answered, so other instances' spending shows up here within
one sync.

Redis unreachable: the mirror keeps limiting per instance and the queue keeps what is owed
(fail open); the outage is logged once, counted, and `/readyz` says degraded. With
`fail_closed`, requests a budget applies to get a 503 until Redis answers again. Each sync tries
again, so Redis coming back resumes sharing without a restart.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from redis.asyncio import Redis

from .. import protobuf_wire as wire
from ..telemetry import fast_series as series
from ..telemetry.fast_series import CounterSeries
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
ACTIVE_S = 60.0  # a bucket untouched this long is no longer refreshed from Redis (nor kept in memory)
REDIS_TIMEOUT_S = 0.5

# Drain by Redis's clock, add this instance's increments, expire when fully drained.
# KEYS[1] bucket; ARGV: token rate/s, request rate/s, tokens to add, requests to add.
_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local v = redis.call('HMGET', KEYS[1], 'tok', 'req', 'at')
local tok = tonumber(v[1]) or 0
local req = tonumber(v[2]) or 0
local at = tonumber(v[3]) or now
local dt = now - at
if dt < 0 then dt = 0 end
local trate = tonumber(ARGV[1])
local rrate = tonumber(ARGV[2])
tok = math.max(0, tok - dt * trate) + tonumber(ARGV[3])
req = math.max(0, req - dt * rrate) + tonumber(ARGV[4])
if tok <= 0 and req <= 0 then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'tok', tostring(tok), 'req', tostring(req), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil(math.max(tok / trate, req / rrate) * 1000) + 1000)
end
return {tostring(tok), tostring(req)}
"""


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


class BudgetGate:
    """Admission and charging for every budget of the table in force."""

    def __init__(self, registry: CollectorRegistry, table: Callable[[], RoutingTable],
                 redis_url: str | None = None, fail_closed: bool = False,
                 clock: Callable[[], float] = time.monotonic, sync_interval: float = SYNC_INTERVAL_S):
        self._table = table  # the routing table in force (its `.budgets`)
        self._clock = clock
        self.metrics = BudgetMetrics(registry)
        self.redis_url = redis_url
        self.fail_closed = fail_closed
        self._sync_interval = sync_interval
        self._mirror: dict[str, list[float]] = {}  # bucket -> [used tokens, used requests, as of]
        self._pending: dict[str, list[float]] = {}  # bucket -> [tokens, requests] not yet in Redis
        self._touched: dict[str, float] = {}  # bucket -> last admission or charge
        self._rates: dict[str, tuple[float, float]] = {}  # bucket -> drain rates of its rule
        self._decided_for: object = None  # the table the caches below were worked out for
        # (object, header values and the caller's key) -> rule, bucket, ...
        self._decisions: dict[tuple[str, tuple[bytes | str | None, ...]], Decision] = {}
        self._answers: dict[AnswerKey, tuple[Admission, bytes | None]] = {}  # answer_key -> answer, its numbers
        self._identities: dict[tuple[str, ...], bytes] = {}  # several objects: head and buckets -> identity
        self.degraded = False
        self._task: asyncio.Task[None] | None = None
        self._client: Redis | None = None

    def configured(self) -> bool:
        """Whether the table in force has any budget: without one, finished answers owe nothing."""
        return has_budgets(self._table().budgets)

    # -- the request path -------------------------------------------------------------------

    def admit(self, route: str, headers: Mapping[str, bytes], caller: Caller | None = None) -> Admitted | None:
        """`headers`: the request's, by name. None when no budget applies; else what to write into
        the request's metadata (budget, rule, hashed key, header values). Raises BudgetRefused
        (429) or a 503 (fail closed). Per request this is a bucket's level and a few dictionary
        lookups: which rule and bucket a set of header values means, and the answer for a level,
        are each worked out once (per table in force). `caller`: for budgets keyed by the caller."""
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
            answer, numbers = self._answer(budget, rule, bucket, now)
            if not answer.allowed:
                self.metrics.refused.labels(budget.name, rule.name, answer.reason).inc()
                raise BudgetRefused(budget.name, rule.name, answer)
            self._used(bucket, rule, rates, now)
            return Admitted(budget.name, rule.name, hashed, answer, [bucket], identity, numbers)
        chosen: list[tuple[Budget, Decided, Admission, bytes | None]] = []
        for budget in objects:
            decision = self._decision(budget, headers, caller)
            if decision:  # not _NO_RULE
                chosen.append((budget, decision, *self._answer(budget, decision[0], decision[2], now)))
        if not chosen:
            return None
        answer = most_restrictive([c[2] for c in chosen])
        budget, (rule, hashed, _, _, _), _, numbers = next(c for c in chosen if c[2] is answer)
        if not answer.allowed:
            self.metrics.refused.labels(budget.name, rule.name, answer.reason).inc()
            raise BudgetRefused(budget.name, rule.name, answer)
        for _, (rule_, _, bucket_, _, rates), _, _ in chosen:
            self._used(bucket_, rule_, rates, now)
        buckets = [c[1][2] for c in chosen]
        # the identity names every bucket (not the one kept for the head's bucket alone), and the
        # head's limits: kept per head and set of buckets, like the decisions
        named = (budget.name, rule.name, hashed, *buckets)
        known = self._identities.get(named)
        if known is None:
            if len(self._identities) > _CACHE_MAX:
                self._identities.clear()
            known = self._identities[named] = _identity(budget.name, rule.name, hashed, answer, buckets)
        return Admitted(budget.name, rule.name, hashed, answer, buckets, known, numbers)

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

    def _answer(self, budget: Budget, rule: BudgetRule, bucket: str, now: float) -> tuple[Admission, bytes | None]:
        """The answer for the bucket's level now, and its encoded numbers (None for a refusal)."""
        if self.degraded and self.fail_closed:
            self.metrics.refused.labels(budget.name, rule.name, "unavailable").inc()
            raise budget_unavailable()
        used_tokens, used_requests = self._usage(bucket, rule, now)
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
        """An admitted request: counted where the rule counts requests; its bucket kept fresh."""
        if rule.requests is not None:
            self._add(bucket, rule, 0.0, 1.0, now)
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
        used_tokens, used_requests = self._usage(bucket, rule, now)
        self._mirror[bucket] = [used_tokens + tokens, used_requests + requests, now]
        self._touched[bucket] = now
        self._rates[bucket] = (rule.token_rate, rule.request_rate)
        if self.redis_url is not None:
            owed = self._pending.setdefault(bucket, [0.0, 0.0])
            owed[0] += tokens
            owed[1] += requests

    # -- the end of an answer (access log) ------------------------------------------------

    def charge(self, buckets: Iterable[str], tokens: int) -> None:
        """Take a finished answer's tokens off each of its buckets (rules of the config in force;
        a bucket whose object or rule is gone is skipped)."""
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
        client = Redis.from_url(self.redis_url, socket_timeout=REDIS_TIMEOUT_S,
                                               socket_connect_timeout=REDIS_TIMEOUT_S)
        self._client = client
        self._script = client.register_script(_LUA)
        self._task = asyncio.create_task(self._sync_loop())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
            self._task = None
        if self._client is not None:
            try:
                await self._client.aclose()
            except Exception:
                pass
            self._client = None

    async def _forget_loop(self) -> None:
        """In process: a bucket drained to zero is the same as no bucket; forget it."""
        while True:
            await asyncio.sleep(10.0)
            self.forget_drained()

    def forget_drained(self) -> int:
        now = self._clock()
        gone = []
        for bucket, (tokens, requests, at) in self._mirror.items():
            token_rate, request_rate = self._rates.get(bucket, (0.0, 0.0))
            if drained(tokens, token_rate, now - at) == 0 and drained(requests, request_rate, now - at) == 0:
                gone.append(bucket)
        for bucket in gone:
            self._mirror.pop(bucket, None)
            self._rates.pop(bucket, None)
            self._touched.pop(bucket, None)
        return len(gone)

    async def _sync_loop(self) -> None:
        while True:
            await self.sync()
            await asyncio.sleep(self._sync_interval)

    async def sync(self) -> bool:
        """One round trip: send what is owed, read back every active bucket. False on failure."""
        now = self._clock()
        for bucket in [b for b, t in self._touched.items() if now - t > ACTIVE_S and b not in self._pending]:
            self._touched.pop(bucket, None)
            self._mirror.pop(bucket, None)
            self._rates.pop(bucket, None)
        buckets = list(self._touched)
        if not buckets:
            self._set_up(True)
            return True
        sent = self._pending
        self._pending = {}
        started = time.perf_counter()
        try:
            assert self._client is not None  # started with a Redis URL
            pipe = self._client.pipeline(transaction=False)
            for bucket in buckets:
                token_rate, request_rate = self._rates.get(bucket, (1.0, 1.0))
                owed = sent.get(bucket, (0.0, 0.0))
                await self._script(keys=[bucket], args=[repr(token_rate), repr(request_rate),
                                                        repr(owed[0]), repr(owed[1])], client=pipe)
            answers = await pipe.execute()
        except Exception as exc:  # the connection, a timeout, a script error: all mean "not now"
            for bucket, owed in sent.items():  # still owed: sent next time
                mine = self._pending.setdefault(bucket, [0.0, 0.0])
                mine[0] += owed[0]
                mine[1] += owed[1]
            self.metrics.redis_errors.inc()
            if not self.degraded:
                log.warning("Redis at %s unreachable (%s): %s until it is back", redacted_url(self.redis_url),
                            type(exc).__name__, "limited requests get 503" if self.fail_closed
                            else "failing open, budgets kept per instance")
            self._set_up(False)
            return False
        self.metrics.redis_seconds.observe(time.perf_counter() - started)
        now = self._clock()
        for bucket, (tokens, requests) in zip(buckets, answers, strict=False):
            since = self._pending.get(bucket, (0.0, 0.0))  # added here while the answer was on its way
            self._mirror[bucket] = [float(tokens) + since[0], float(requests) + since[1], now]
        if self.degraded:
            log.warning("Redis at %s is back: budgets are shared again", redacted_url(self.redis_url))
        self._set_up(True)
        self.metrics.syncs.inc()
        return True

    def _set_up(self, up: bool) -> None:
        self.degraded = not up
        self.metrics.redis_up.set(1 if up else 0)


def redacted_url(url: str | None) -> str:
    """The URL without a password (redis://user:secret@host -> redis://user:***@host)."""
    if not url or "@" not in url:
        return url or ""
    scheme, _, rest = url.partition("://")
    creds, _, host = rest.rpartition("@")
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
