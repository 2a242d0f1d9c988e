"""Which model server of a pool serves a request: pure scoring over a snapshot of the
endpoints' load (docs/in-cluster-models.md).

A model server is not a web server: a long prompt sent to a pod whose queue is full, or whose
KV cache is exhausted, waits while another idles. So, per request, over the pool's ready
endpoints (those ejected after failures left out, unless all are):

- with fresh metrics (scraped within `stale_s`): each endpoint is scored on its queue (requests
  waiting and running, plus those this gateway sent it since the scrape, which the scrape could
  not see yet), its KV-cache use, whether it recently served the same prompt prefix (its cache
  holds it: affinity, unless it is overloaded) and whether it holds the requested LoRA adapter;
  the best score wins;
- with no fresh metrics anywhere: least outstanding requests, as this gateway counts them.

The ranking, best first, gives the first attempt's endpoint and, for a rule with retries, the
next attempt's (another endpoint). `extproc route` shows the scores. State (the loads, the
outstanding counts, the prefix memory) is `extproc.policy.endpoint_state`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass

# Prompt-prefix affinity: the prompt is cut in blocks, each block's hash chained with the ones
# before (the same text after a different beginning is another prefix), as model servers' prefix
# caches key their KV blocks. Blocks past the last are not looked at.
PREFIX_BLOCK = 256  # bytes of the request body, from the prompt's field on
PREFIX_BLOCKS = 32  # 8 KiB: a shared system prompt or document


@dataclass(frozen=True, slots=True)
class Load:
    """One endpoint's load, as its last good scrape said (vLLM's names in brackets)."""

    waiting: float  # requests queued (vllm:num_requests_waiting)
    running: float  # requests being served (vllm:num_requests_running)
    kv_usage: float  # KV-cache use, 0 to 1 (vllm:kv_cache_usage_perc, formerly vllm:gpu_cache_usage_perc)
    adapters: frozenset[str] = frozenset()  # LoRA adapters running or waiting (vllm:lora_requests_info)
    max_adapters: int = 0  # how many it may hold at once (max_lora); 0: unknown
    at: float = 0.0  # when scraped (the clock of `pick`)
    sent_before: int = 0  # requests this gateway had sent it when the scrape began (a running count)


@dataclass(frozen=True, slots=True)
class PickerSettings:
    """The picker's thresholds: above either, an endpoint is overloaded (no prefix affinity)."""

    queue_threshold: float = 8.0  # requests waiting
    kv_threshold: float = 0.8  # KV-cache use
    stale_s: float = 1.0  # metrics older than this are not trusted
    # weights of the scores (each score from 0 to 1)
    queue_weight: float = 2.0
    kv_weight: float = 1.0
    prefix_weight: float = 3.0
    lora_weight: float = 3.0  # holding the adapter; room to load it: a third of it


DEFAULT_SETTINGS = PickerSettings()
OVERLOAD_PENALTY = 100.0  # more than every score together


@dataclass(frozen=True, slots=True)
class Scored:
    endpoint: str
    score: float
    why: str  # for `extproc route` and the debug log: the parts of the score


@dataclass(frozen=True, slots=True)
class Ranking:
    """The pool's endpoints, best first, and how they were ranked ("load" or "least-outstanding")."""

    order: tuple[Scored, ...]
    basis: str

    @property
    def best(self) -> str | None:
        return self.order[0].endpoint if self.order else None

    def endpoint(self, rank: int) -> str | None:
        """The endpoint of the `rank`-th attempt (0: the first): another one for each, while there are."""
        if not self.order:
            return None
        return self.order[min(rank, len(self.order) - 1)].endpoint


NO_ENDPOINT = Ranking((), "none")


def prefix_hashes(body: bytes) -> tuple[int, ...]:
    """The chained hashes of the prompt's blocks, from its field on (`messages`, `prompt` or
    `input`): two requests that share a beginning share their first hashes. Cheap: bytes are
    hashed as they are, never parsed (the body was already checked)."""
    start = -1
    for field in (b'"messages"', b'"prompt"', b'"input"'):
        start = body.find(field)
        if start != -1:
            break
    if start == -1:
        return ()
    hashes, chained = [], 0
    end = min(len(body), start + PREFIX_BLOCK * PREFIX_BLOCKS)
    for offset in range(start, end - PREFIX_BLOCK + 1, PREFIX_BLOCK):
        chained = hash((chained, body[offset:offset + PREFIX_BLOCK]))
        hashes.append(chained)
    return tuple(hashes)


def overloaded(load: Load, settings: PickerSettings = DEFAULT_SETTINGS) -> bool:
    return load.waiting > settings.queue_threshold or load.kv_usage > settings.kv_threshold


def pick(endpoints: Sequence[str], loads: Mapping[str, Load], outstanding: Mapping[str, int], now: float,
         ejected: Set[str] = frozenset(), prefix: Mapping[str, float] | None = None, adapter: str | None = None,
         settings: PickerSettings = DEFAULT_SETTINGS, tie: int = 0, sent: Mapping[str, int] | None = None) -> Ranking:
    """The pool's ready `endpoints` ranked for one request. `loads`: each one's last good
    scrape; `outstanding`: requests this gateway sent it that have not finished; `ejected`:
    endpoints left out after failures (all ejected: all tried anyway); `prefix`: the endpoints
    that recently served a prefix of this prompt, each with how much of the prompt that is
    (0 to 1); `adapter`: the model asked for, a LoRA adapter where an endpoint lists it; `tie`:
    a number that varies per request, to spread equal scores; `sent`: requests sent to each so
    far (a running count: those sent since its scrape began are queued there, unseen by it)."""
    if not endpoints:
        return NO_ENDPOINT
    candidates = [e for e in endpoints if e not in ejected] or list(endpoints)
    count = len(candidates)
    fresh = {e: loads[e] for e in candidates if e in loads and now - loads[e].at <= settings.stale_s}
    if not fresh:  # no metrics to go by: the fewest requests in flight, as this gateway counts them
        ranked = sorted(range(count), key=lambda i: (outstanding.get(candidates[i], 0), (i - tie) % count))
        return Ranking(tuple(Scored(candidates[i], -float(outstanding.get(candidates[i], 0)),
                                    f"outstanding={outstanding.get(candidates[i], 0)} (metrics stale)")
                             for i in ranked), "least-outstanding")
    sent = sent or {}
    queues = {e: load.waiting + load.running + max(0, sent.get(e, 0) - load.sent_before)
              for e, load in fresh.items()}
    low, high = min(queues.values()), max(queues.values())
    # a difference of a request or two is noise next to the KV cache's: the queue score spans
    # at least `queue_threshold` requests
    spread = max(high - low, settings.queue_threshold)
    adapters_known = adapter is not None and any(adapter in load.adapters for load in fresh.values())
    scored = []
    for i, endpoint in enumerate(candidates):
        load = fresh.get(endpoint)
        if load is None:  # stale among fresh ones: last, by what this gateway sent it
            scored.append((-1.0 - outstanding.get(endpoint, 0), (i - tie) % count, endpoint,
                           f"stale, outstanding={outstanding.get(endpoint, 0)}"))
            continue
        queue = queues[endpoint]
        queue_score = (high - queue) / spread
        kv_score = 1.0 - min(max(load.kv_usage, 0.0), 1.0)
        score = settings.queue_weight * queue_score + settings.kv_weight * kv_score
        parts = [f"queue={queue:g}", f"kv={load.kv_usage:.2f}"]
        busy = overloaded(load, settings)
        share = prefix.get(endpoint) if prefix else None
        if share and not busy:
            score += settings.prefix_weight * share
            parts.append(f"prefix={share:.2f}")
        if adapters_known:
            assert adapter is not None
            if adapter in load.adapters:
                score += settings.lora_weight
                parts.append("lora=loaded")
            elif load.max_adapters and len(load.adapters) < load.max_adapters:
                score += settings.lora_weight / 3
                parts.append("lora=room")
        if busy:  # last, while any is not
            score -= OVERLOAD_PENALTY
            parts.append("overloaded")
        scored.append((score, (i - tie) % count, endpoint, " ".join(parts)))
    scored.sort(key=lambda s: (-s[0], s[1]))
    return Ranking(tuple(Scored(endpoint, round(score, 3), why) for score, _, endpoint, why in scored), "load")
