"""W3C trace context for the request path: a client's `traceparent` continued, the ids of the
gateway's spans chosen when the request is decided, and the `traceparent` each attempt sends
its provider (docs/tracing.md).

The spans themselves are built later, from the access log (`extproc.telemetry.spans`); the ids
travel with the request in its dynamic metadata. Each attempt's span id is derived from the
request's span id and the attempt's number (`attempt_span_id`), so the ext_proc (attempt 1), the
retry processor (attempts 2+) and the span builder agree on it without sharing any state.

Sampling follows the standard variables: `OTEL_TRACES_SAMPLER` (`always_on`, `always_off`,
`traceidratio`, and their `parentbased_` forms, the default `parentbased_always_on`) with
`OTEL_TRACES_SAMPLER_ARG` for the ratio. A request that is not sampled costs nothing more: its
client's `traceparent`, if any, passes to the provider unchanged.
"""

from __future__ import annotations

import os
import random
from collections.abc import Mapping
from dataclasses import dataclass

TRACEPARENT = "traceparent"
_HEX = frozenset("0123456789abcdef")
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15  # spreads attempt numbers over the 64 bits


@dataclass(frozen=True, slots=True)
class TraceContext:
    """A request's place in a trace: its trace, the gateway's span for it, the client's span."""

    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits: the gateway's span for the whole request
    parent_span_id: str  # the client's span, "" when the request started the trace


def parse_traceparent(value: bytes | str | None) -> tuple[str, str, bool] | None:
    """(trace id, parent span id, sampled) of a version-00 `traceparent`, or None if it is absent
    or malformed (then the gateway starts a new trace, as the W3C spec says)."""
    if value is None:
        return None
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    parts = text.strip().lower().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    version, trace_id, span_id, flags = parts[0], parts[1], parts[2], parts[3]
    if version == "00" and len(parts) != 4:
        return None
    if len(trace_id) != 32 or len(span_id) != 16 or len(flags) != 2:
        return None
    if not _HEX.issuperset(trace_id + span_id + flags + version):
        return None
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, bool(int(flags, 16) & 1)


def attempt_span_id(request_span_id: str, attempt: int) -> str:
    """The span id of the request's `attempt`-th attempt (1 for the first): derived, never 0."""
    derived = (int(request_span_id, 16) + attempt * _GOLDEN) & _MASK64
    return f"{derived or 1:016x}"


def traceparent(trace_id: str, span_id: str, sampled: bool = True) -> str:
    return f"00-{trace_id}-{span_id}-{'01' if sampled else '00'}"


@dataclass(frozen=True, slots=True)
class Sampler:
    """Which requests get spans: a ratio of new traces, and whether a client's decision counts."""

    ratio: float = 1.0
    parent_based: bool = True

    def sampled(self, parent_sampled: bool | None, trace_id: str) -> bool:
        if parent_sampled is not None and self.parent_based:
            return parent_sampled
        if self.ratio >= 1.0:
            return True
        if self.ratio <= 0.0:
            return False
        # as the SDK's TraceIdRatioBased: the trace id's low 64 bits against the ratio's share
        return int(trace_id[16:], 16) < int(self.ratio * (1 << 64))

    def start(self, client: bytes | str | None, draw: random.Random | None = None) -> TraceContext | None:
        """The request's trace context, or None when it is not sampled."""
        parsed = parse_traceparent(client)
        rand = draw or _random
        if parsed is not None:
            trace_id, parent, parent_sampled = parsed
        else:
            trace_id, parent, parent_sampled = f"{rand.getrandbits(128) or 1:032x}", "", None
        if not self.sampled(parent_sampled, trace_id):
            return None
        return TraceContext(trace_id, f"{rand.getrandbits(64) or 1:016x}", parent)


_random = random.Random()


def sampler_from_env(environ: Mapping[str, str] | None = None) -> Sampler:
    """The sampler `OTEL_TRACES_SAMPLER` and `OTEL_TRACES_SAMPLER_ARG` name (unknown names: the
    default, parentbased_always_on)."""
    env = os.environ if environ is None else environ
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    parent_based = name.startswith("parentbased_")
    kind = name.removeprefix("parentbased_")
    ratio = 1.0
    if kind == "always_off":
        ratio = 0.0
    elif kind == "traceidratio":
        try:
            ratio = min(max(float(env.get("OTEL_TRACES_SAMPLER_ARG", "1.0")), 0.0), 1.0)
        except ValueError:
            ratio = 1.0
    return Sampler(ratio, parent_based)
