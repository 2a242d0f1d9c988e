"""Spend kept in Redis, across every instance that shares it (`--redis`, as budgets do): who
spent what since when, for `/spend` and `extproc spend` (docs/cost.md).

Each process adds what its ledger (`extproc.telemetry.spend.SpendLedger`) counted since its last
flush, every `FLUSH_S`, in one script call: nothing on the request path, one Redis round trip per
second per process. The keys are bounded in time and in size:

- one hash per UTC day, `llmgw:spend:<YYYY-MM-DD>`, expiring `retention_days()` after its
  last write (31 days by default, `LLM_GATEWAY_SPEND_DAYS`);
- one field per (caller, route, provider, model, currency), the five as a JSON array, holding
  `requests input output cached cost_units cost_pico unmetered` as text: the cost exact, whole
  units and the pico-units below one (Lua numbers are doubles: exact to 2^53 each);
- at most `MAX_ROWS` fields per day (`LLM_GATEWAY_SPEND_ROWS`): past it, a row new to the day
  is added to the row of caller and model `other` (route, provider and currency kept: they come
  from the config, and amounts of two currencies are never added).

A flush adds the increments in a Lua script (atomic per day key, so instances never lose each
other's counts). A flush that fails is sent again at the next one; one whose answer is lost
after Redis ran it (a timeout past the script) may count twice. What a process counted but never
flushed (it was killed) is lost to Redis; its own `/metrics` said it while it ran.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import orjson
from prometheus_client import CollectorRegistry
from redis.asyncio import Redis

from .fast_series import Counter
from .spend import PICO, Counts, SpendKey, SpendLedger, check_groups, report_of

log = logging.getLogger(__name__)

KEY_PREFIX = "llmgw:spend"
FLUSH_S = 1.0
RETENTION_DAYS = 31
MAX_ROWS = 10_000
TIMEOUT_S = 2.0  # one round trip, connecting included
_FIELDS = 7  # requests, input, output, cached, cost units, cost pico-units, unmetered attempts

# KEYS[1]: the day's hash. ARGV: the most fields it may hold, its expiry (seconds), then per row its
# field, the field of its "other" row, and the seven increments.
ADD = """
local limit = tonumber(ARGV[1])
for i = 3, #ARGV, 9 do
  local field = ARGV[i]
  local current = redis.call('HGET', KEYS[1], field)
  if not current and redis.call('HLEN', KEYS[1]) >= limit then
    field = ARGV[i + 1]
    current = redis.call('HGET', KEYS[1], field)
  end
  local v = {0, 0, 0, 0, 0, 0, 0}
  if current then
    local j = 1
    for x in string.gmatch(current, '%S+') do v[j] = tonumber(x); j = j + 1 end
  end
  for j = 1, 7 do v[j] = v[j] + tonumber(ARGV[i + 1 + j]) end
  if v[6] >= 1e12 then
    v[5] = v[5] + math.floor(v[6] / 1e12)
    v[6] = v[6] % 1e12
  end
  redis.call('HSET', KEYS[1], field, string.format('%.0f %.0f %.0f %.0f %.0f %.0f %.0f',
             v[1], v[2], v[3], v[4], v[5], v[6], v[7]))
end
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return 1
"""


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    try:
        return max(1, int(value)) if value else default
    except ValueError:
        raise ValueError(f"{name} must be a whole number (got {value!r})") from None


def retention_days() -> int:
    """How many days a day's spend is kept in Redis after its last write (LLM_GATEWAY_SPEND_DAYS)."""
    return _env_int("LLM_GATEWAY_SPEND_DAYS", RETENTION_DAYS)


def max_rows() -> int:
    """The most (caller, route, provider, model, currency) rows a day keeps (LLM_GATEWAY_SPEND_ROWS)."""
    return _env_int("LLM_GATEWAY_SPEND_ROWS", MAX_ROWS)


def day_key(day: date) -> str:
    return f"{KEY_PREFIX}:{day.isoformat()}"


def row_field(key: SpendKey) -> str:
    return orjson.dumps(list(key)).decode()


def _today(clock: Callable[[], float]) -> date:
    return datetime.fromtimestamp(clock(), UTC).date()


def increments(entries: dict[SpendKey, list[int]], sent: dict[SpendKey, list[int]]) -> list[tuple[SpendKey, list[int]]]:
    """What the ledger counted since `sent` (what the last flush carried), per row, in the store's
    seven numbers (the cost split into whole units and pico-units)."""
    out = []
    for key, entry in entries.items():
        before = sent.get(key)
        delta = [now - (before[i] if before is not None else 0) for i, now in enumerate(entry)]
        if any(delta):
            units, pico = divmod(delta[4], PICO)
            out.append((key, [delta[0], delta[1], delta[2], delta[3], units, pico, delta[5]]))
    return out


class SpendWriter:
    """Adds one process's spend to Redis every `interval` (a task of the process's event loop)."""

    def __init__(self, ledger: SpendLedger, url: str, registry: CollectorRegistry,
                 clock: Callable[[], float] = time.time, interval: float = FLUSH_S):
        self._ledger = ledger
        self._client = Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        self._add = self._client.register_script(ADD)  # EVALSHA, the script loaded again after a restart
        self._clock = clock
        self._interval = interval
        self._sent: dict[SpendKey, list[int]] = {}
        self._task: asyncio.Task[None] | None = None
        self._failing = False
        flushes = Counter("llm_gateway_spend_flushes", "Spend sent to Redis, by result: ok, failed (sent again "
                                                       "at the next flush)", ("result",), registry=registry)
        self._ok, self._failed = flushes.labels("ok"), flushes.labels("failed")

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.flush()

    async def flush(self) -> bool:
        """Send what was counted since the last flush; False when Redis did not take it."""
        entries = {key: list(entry) for key, entry in self._ledger.entries.items()}  # as of now
        rows = increments(entries, self._sent)
        if not rows:
            return True
        args: list[Any] = [max_rows(), retention_days() * 86400]
        for (caller, route, provider, model, currency), numbers in rows:
            args += [row_field((caller, route, provider, model, currency)),
                     row_field(("other", route, provider, "other", currency)), *numbers]
        try:
            async with asyncio.timeout(TIMEOUT_S * 2):
                await self._add(keys=[day_key(_today(self._clock))], args=args)
        except Exception as exc:  # the connection, a timeout: sent again next time
            self._failed.inc()
            if not self._failing:
                log.warning("cannot add spend to Redis (%s): kept, sent again when it answers", type(exc).__name__)
            self._failing = True
            return False
        if self._failing:
            log.warning("spend reaches Redis again")
        self._failing = False
        self._sent = entries
        self._ok.inc()
        return True

    async def stop(self) -> None:
        """The last flush (bounded), then the connection closed."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        try:
            await self.flush()
        finally:
            await self._client.aclose()


class SpendStore:
    """Reads the spend every instance added to Redis, as the report `/spend` answers."""

    def __init__(self, url: str, clock: Callable[[], float] = time.time):
        self._client = Redis.from_url(url, socket_timeout=TIMEOUT_S * 2, socket_connect_timeout=TIMEOUT_S)
        self._clock = clock

    async def report(self, by: Sequence[str], since: date | None = None) -> dict[str, Any]:
        """Who spent what from `since` (a UTC day; None: the first day Redis still keeps) to now,
        grouped by `by`. Raises ValueError for a bad group or day, a Redis error when it cannot
        be read."""
        check_groups(by)
        today = _today(self._clock)
        first = today - timedelta(days=retention_days())
        if since is not None and since > today:
            raise ValueError(f"since {since.isoformat()} is after today ({today.isoformat()}, UTC)")
        start = max(since, first) if since is not None else first
        days = [start + timedelta(days=i) for i in range((today - start).days + 1)]
        pipe = self._client.pipeline(transaction=False)
        for day in days:
            pipe.hgetall(day_key(day))
        async with asyncio.timeout(TIMEOUT_S * 2):
            kept = await pipe.execute()
        counted: list[tuple[SpendKey, Counts]] = []
        seen: date | None = None
        for day, fields in zip(days, kept, strict=True):
            if fields and seen is None:
                seen = day
            for field, value in fields.items():
                counted.append(_row(field, value))
        began = since if since is not None else (seen or today)
        return report_of(counted, by, f"{max(began, first).isoformat()}T00:00:00Z", "redis")

    async def close(self) -> None:
        await self._client.aclose()


def _row(field: bytes, value: bytes) -> tuple[SpendKey, Counts]:
    caller, route, provider, model, currency = (str(part) for part in orjson.loads(field))
    numbers = [int(float(x)) for x in value.split()] + [0] * _FIELDS
    requests, prompt, completion, cached, units, pico, unmetered = numbers[:_FIELDS]
    return ((caller, route, provider, model, currency),
            (requests, prompt, completion, cached, Decimal(units) + Decimal(pico) / PICO, unmetered))


def parse_day(text: str) -> date:
    """A `since` day as written in a query (YYYY-MM-DD)."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise ValueError(f"since must be a day, YYYY-MM-DD (got {text!r})") from None
