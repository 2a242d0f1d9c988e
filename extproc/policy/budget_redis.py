"""Redis's side of shared budgets: the two Lua scripts and the link that sends them in one
pipelined round trip (`extproc.policy.budget_gate` decides what to send and when, and sends one
round trip at a time, so answers apply in the order Redis ran them).

A bucket is a hash `{tok, req, at, big}`: what it has used and when that was true, by Redis's
clock (so the instances' clocks do not matter), and the largest charge it was sent at once (an
access-log batch's worth: what "a few answers" means for this bucket, on every instance). Both
scripts first drain it to Redis's now, take back the lease this instance gives back and add what
it owes (increments not yet sent); where Redis has no such bucket, they raise it to what this
instance knew of it (`floor`: after Redis restarted empty, the first instance to sync a bucket it
still follows puts it back; a bucket that expired, fully drained, has a floor of about nothing).
Then they grant a lease where the rule counts requests, and store the bucket with an expiry for
when it will be fully drained (idle keys disappear):

- **A lease** is requests counted in Redis now, for this instance to admit from memory until its
  next sync: as many as it wants (twice what it admitted in the last sync interval), at most a
  quarter (`LEASE_SHARE`) of what still fits. Counted when granted, so no instance ever admits a
  request Redis did not count: requests are exact across instances. What is left of a lease is
  given back at the next sync (all of it when the instance saw no request of the key).
- `SYNC` (one bucket): the above, and the bucket's state is answered (`tok`, `req`, Redis's time,
  `big`, the lease).
- `ADMIT` (the buckets of one request, for `n` requests alike): the above for every bucket, then
  how many of the `n` every bucket admits (`k`: none once a bucket has used all its tokens; at
  most as many as still fit where a rule counts requests), and those `k` are counted, atomically,
  before the lease. Answered: `k`, Redis's time, and each bucket's `tok`, `req` (before the `k`
  and the lease were counted), `big` and the lease.

Numbers go both ways as text with 17 significant digits (Lua's own `tostring` keeps 14), so what
the gate computes from an answer is what the script decided on. Scripts are sent by their SHA
(`EVALSHA`), loaded again only when Redis answers that it does not know them (after a restart):
one round trip in the usual case (redis-py's own pipelined scripts ask `SCRIPT EXISTS` first,
every time).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Sequence
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import NoScriptError

LEASE_SHARE = 0.25  # a lease is at most this share of the requests that still fit
# Per bucket, both scripts take these values (ARGV, in this order, from `a`): its rule's drain rates,
# what this instance owes it, what this instance knows it has used (the floor), the lease given back,
# its rule's limits (requests 0: the rule does not count requests), and the lease wanted.
BUCKET_ARGS = ("token rate", "request rate", "tokens owed", "requests owed", "tokens floor", "requests floor",
               "lease back", "token limit", "request limit", "lease wanted")
_COMMON = """
local function level(key, a)
  local v = redis.call('HMGET', key, 'tok', 'req', 'at', 'big')
  local tok = tonumber(v[1]) or 0
  local req = tonumber(v[2]) or 0
  local at = tonumber(v[3]) or now
  local big = math.max(tonumber(v[4]) or 0, tonumber(ARGV[a + 2]))
  local dt = now - at
  if dt < 0 then dt = 0 end
  tok = math.max(0, tok - dt * tonumber(ARGV[a])) + tonumber(ARGV[a + 2])
  req = math.max(0, req - dt * tonumber(ARGV[a + 1]) - tonumber(ARGV[a + 6])) + tonumber(ARGV[a + 3])
  if not v[3] then  -- Redis lost the bucket (it restarted empty): what this instance knew is put back
    tok = math.max(tok, tonumber(ARGV[a + 4]))
    req = math.max(req, tonumber(ARGV[a + 5]))
  end
  return tok, req, big
end
local function lease(a, req)
  local limit = tonumber(ARGV[a + 8])
  local wanted = tonumber(ARGV[a + 9])
  if limit <= 0 or wanted <= 0 then return 0 end
  local share = math.floor(math.floor(limit - req + 1e-9) * LEASE_SHARE)
  return math.max(0, math.min(wanted, share))
end
local function store(key, a, tok, req, big)
  if tok <= 0 and req <= 0 then
    redis.call('DEL', key)
  else
    redis.call('HSET', key, 'tok', string.format('%.17g', tok), 'req', string.format('%.17g', req),
               'at', string.format('%.17g', now), 'big', string.format('%.17g', big))
    redis.call('PEXPIRE', key, math.ceil(math.max(tok / tonumber(ARGV[a]), req / tonumber(ARGV[a + 1])) * 1000) + 1000)
  end
end
""".replace("LEASE_SHARE", repr(LEASE_SHARE))
_CLOCK = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
"""

# KEYS[1] the bucket; ARGV: BUCKET_ARGS. Answers tok, req (the lease granted counted), Redis's time, big, the lease.
SYNC = _CLOCK + _COMMON + """
local tok, req, big = level(KEYS[1], 1)
local granted = lease(1, req)
req = req + granted
store(KEYS[1], 1, tok, req, big)
return {string.format('%.17g', tok), string.format('%.17g', req), string.format('%.17g', now),
        string.format('%.17g', big), granted}
"""

# KEYS: the request's buckets; ARGV[1] = n; then BUCKET_ARGS per bucket. Answers k, Redis's time, then per
# bucket tok, req (before the k and the lease were counted), big, the lease granted.
ADMIT = _CLOCK + _COMMON + """
local n = tonumber(ARGV[1])
local k = n
local levels = {}
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 10
  local tok, req, big = level(key, a)
  levels[i] = {tok, req, big}
  if tok >= tonumber(ARGV[a + 7]) then k = 0 end
  local requests = tonumber(ARGV[a + 8])
  if requests > 0 then
    local fit = math.floor(requests - req + 1e-9)
    if fit < k then k = math.max(0, fit) end
  end
end
local out = {k, string.format('%.17g', now)}
for i, key in ipairs(KEYS) do
  local a = 2 + (i - 1) * 10
  local tok, req, big = levels[i][1], levels[i][2], levels[i][3]
  out[#out + 1] = string.format('%.17g', tok)
  out[#out + 1] = string.format('%.17g', req)
  out[#out + 1] = string.format('%.17g', big)
  local granted = 0
  if tonumber(ARGV[a + 8]) > 0 then
    req = req + k
    granted = lease(a, req)
    req = req + granted
  end
  out[#out + 1] = granted
  store(key, a, tok, req, big)
end
return out
"""

_SCRIPTS = {"sync": SYNC, "admit": ADMIT}
_SHAS = {name: hashlib.sha1(text.encode()).hexdigest() for name, text in _SCRIPTS.items()}


def number(value: float) -> str:
    """A number for a script: exact (repr), as Lua's tonumber reads it."""
    return repr(float(value))


class Call:
    """One script call of a round trip: which script, its keys and arguments."""

    __slots__ = ("script", "keys", "args")

    def __init__(self, script: str, keys: Sequence[str], args: Sequence[str]):
        self.script, self.keys, self.args = script, keys, args


class RedisLink:
    """The gate's connection to Redis: a round trip at a time, each bounded by `timeout`."""

    def __init__(self, url: str, timeout: float):
        self._client = Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._timeout = timeout

    async def round_trip(self, calls: list[Call]) -> list[Any]:
        """The answers of `calls`, run in one pipeline (a PING when there are none: is Redis
        there?). Raises on any failure (connection, timeout, a script's error)."""
        async with asyncio.timeout(self._timeout):
            if not calls:
                await self._client.ping()
                return []
            answers = await self._run(calls)
            missing = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
            if missing:  # Redis restarted: the scripts once more, then what could not run
                for text in _SCRIPTS.values():
                    await self._client.script_load(text)
                again = await self._run([calls[i] for i in missing])
                for i, answer in zip(missing, again, strict=True):
                    answers[i] = answer
        for answer in answers:
            if isinstance(answer, Exception):
                raise answer
        return answers

    async def _run(self, calls: list[Call]) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for call in calls:
            pipe.evalsha(_SHAS[call.script], len(call.keys), *call.keys, *call.args)
        answers: list[Any] = await pipe.execute(raise_on_error=False)
        return answers

    async def close(self) -> None:
        await self._client.aclose()
