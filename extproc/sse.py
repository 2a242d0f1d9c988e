"""Reading an OpenAI-style server-sent event stream as it passes: content, usage, errors.

Chunks arrive as the network delivers them, so an event can be split across chunks; the
reader keeps the unfinished tail and completes it with the next chunk. Pure: no I/O, no clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

_MAX_CARRY = 1 << 20  # an event larger than this is dropped (usage events are tiny)


@dataclass
class StreamSummary:
    """What the stream said so far."""

    events: int = 0
    content_events: int = 0  # events carrying generated text (delta.content, delta.tool_calls, or text)
    model: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    error: str | None = None  # the `error.type` (or code) of an error event
    done: bool = False


@dataclass
class SSEReader:
    summary: StreamSummary = field(default_factory=StreamSummary)
    _carry: bytes = b""

    def feed(self, chunk: bytes) -> int:
        """Read a chunk; returns how many content events it completed (for time to first token)."""
        data = self._carry + chunk if self._carry else chunk
        data = data.replace(b"\r\n", b"\n")
        *complete, rest = data.split(b"\n\n")
        self._carry = rest if len(rest) <= _MAX_CARRY else b""
        before = self.summary.content_events
        for block in complete:
            self._event(block)
        return self.summary.content_events - before

    def finish(self) -> StreamSummary:
        """The stream ended: a last event without its blank line still counts."""
        if self._carry.strip():
            self._event(self._carry)
            self._carry = b""
        return self.summary

    def _event(self, block: bytes) -> None:
        payload = b"\n".join(line[5:].lstrip(b" ") for line in block.split(b"\n") if line.startswith(b"data:"))
        if not payload:
            return
        s = self.summary
        s.events += 1
        if payload.strip() == b"[DONE]":
            s.done = True
            return
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if not isinstance(event, dict):
            return
        if isinstance(event.get("model"), str):
            s.model = event["model"]
        error = event.get("error")
        if error is not None:
            s.error = _error_type(error)
        usage = event.get("usage")
        if isinstance(usage, dict):
            s.prompt_tokens = _int(usage.get("prompt_tokens"), s.prompt_tokens)
            s.completion_tokens = _int(usage.get("completion_tokens"), s.completion_tokens)
            s.total_tokens = _int(usage.get("total_tokens"), s.total_tokens)
        choices = event.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                delta = choice.get("delta") if isinstance(choice, dict) else None
                if isinstance(delta, dict) and (delta.get("content") or delta.get("tool_calls")) or (
                        isinstance(choice, dict) and choice.get("text")):  # a completions stream
                    s.content_events += 1
                    break


def _int(value, default: int | None) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _error_type(error) -> str:
    if isinstance(error, dict):
        for key in ("type", "code"):
            if isinstance(error.get(key), str) and error[key]:
                return error[key][:64]
    return "stream_error"
