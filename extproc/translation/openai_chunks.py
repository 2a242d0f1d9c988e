"""OpenAI's chat answers, the common form every translation goes through: a JSON answer
(`chat.completion`) and the chunks a stream of it is made of (`chat.completion.chunk`).

- `ChunkJoiner`: chunks joined into one answer, as OpenAI would have sent it unstreamed (the
  deltas per choice: content, refusal, reasoning, tool calls by index; finish reasons; usage);
- `answer_chunks`: one answer split into the chunks OpenAI would have streamed for it;
- `usage`: token counts in OpenAI's shape, cached prompt tokens included in the prompt's;
- `OpenAIStreamDecoder` and `OpenAIStreamEncoder`: a provider's OpenAI stream read into chunks,
  and chunks written as the stream an OpenAI client reads (`data: [DONE]` last).

Every provider's stream is decoded into these chunks, event by event (`extproc.translation.anthropic`,
`gemini`, `bedrock`), and every client's stream is encoded from them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson

from ..errors import error_type
from .sse import EventSplitter

DONE = b"data: [DONE]\n\n"
Chunk = dict[str, Any]
# What a client is told when the provider's stream ended before its last event (cut, or ended
# early): the stream's last event is this error, never a silently shortened answer.
INCOMPLETE_MESSAGE = "the provider's stream ended before it was complete: the answer is cut short"
INCOMPLETE_CODE = "stream_incomplete"

_JOINED = ("content", "refusal", "reasoning_content")  # text fields a stream sends in pieces


def usage(prompt: int, completion: int, cached: int | None = None, total: int | None = None) -> dict[str, Any]:
    """Token counts in OpenAI's shape: `prompt_tokens` includes the cached ones, which
    `prompt_tokens_details.cached_tokens` counts apart (where the provider reports them)."""
    counted: dict[str, Any] = {"prompt_tokens": prompt, "completion_tokens": completion,
                               "total_tokens": total if total is not None else prompt + completion}
    if cached is not None:
        counted["prompt_tokens_details"] = {"cached_tokens": cached}
    return counted


def openai_error_type(status: int) -> str:
    """The `type` OpenAI's errors have for a status (a provider's error translated into OpenAI's)."""
    return _ERROR_TYPES.get(status) or error_type(status)


_ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                429: "rate_limit_error"}


def error_chunk(message: str, kind: str = "server_error", code: str | None = None) -> Chunk:
    """An error as OpenAI sends it inside a stream (the SDKs raise it)."""
    return {"error": {"message": message, "type": kind, "code": code}}


class ChunkJoiner:
    """Chunks in, one chat answer out."""

    __slots__ = ("head", "usage", "_choices", "_texts", "_calls", "seen")

    def __init__(self) -> None:
        self.head: dict[str, Any] = {}
        self.usage: dict[str, Any] | None = None
        self._choices: dict[int, dict[str, Any]] = {}
        self._texts: dict[tuple[int, str], list[str]] = {}
        self._calls: dict[int, dict[int, dict[str, Any]]] = {}
        self.seen = False

    def add(self, event: object) -> dict[str, Any] | None:
        """One chunk; an error event is returned (`{"error": ...}`), and so is a chunk that is
        not one (None otherwise)."""
        if not isinstance(event, dict):
            return {"error": "not a chunk"}
        if isinstance(event.get("error"), dict) and not event.get("choices"):
            return {"error": event["error"]}
        self.seen = True
        head = self.head
        for key in ("id", "created", "model", "system_fingerprint"):
            if key not in head and event.get(key) is not None:
                head[key] = event[key]
        if event.get("usage") is not None:
            self.usage = event["usage"]
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                return {"error": "not a chunk"}
            index = choice.get("index", 0)
            merged = self._choices.setdefault(index, {"index": index,
                                                      "message": {"role": "assistant", "content": None},
                                                      "logprobs": None, "finish_reason": None})
            delta = choice.get("delta") or {}
            if delta.get("role"):
                merged["message"]["role"] = delta["role"]
            for field in _JOINED:
                if isinstance(delta.get(field), str):
                    self._texts.setdefault((index, field), []).append(delta[field])
            for call in delta.get("tool_calls") or ():
                _merge_call(self._calls.setdefault(index, {}), call)
            if choice.get("finish_reason") is not None:
                merged["finish_reason"] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                merged["logprobs"] = merged["logprobs"] or {"content": []}
                merged["logprobs"]["content"].extend(logprobs["content"])
        return None

    def answer(self) -> dict[str, Any]:
        choices = self._choices
        for (index, field), parts in self._texts.items():
            choices[index]["message"][field] = "".join(parts)
        for index, by_position in self._calls.items():
            choices[index]["message"]["tool_calls"] = [by_position[i] for i in sorted(by_position)]
        head = self.head
        answer: dict[str, Any] = {"id": head.get("id", ""), "object": "chat.completion",
                                  "created": head.get("created", 0), "model": head.get("model", ""),
                                  "choices": [choices[i] for i in sorted(choices)]}
        if "system_fingerprint" in head:
            answer["system_fingerprint"] = head["system_fingerprint"]
        if self.usage is not None:
            answer["usage"] = self.usage
        return answer


def _merge_call(calls: dict[int, dict[str, Any]], piece: object) -> None:
    """One streamed piece of a tool call into the call it belongs to (by its index): id, type and
    name as they come, the arguments joined."""
    if not isinstance(piece, dict):
        return
    call = calls.setdefault(piece.get("index", len(calls)), {"id": None, "type": "function",
                                                            "function": {"name": None, "arguments": ""}})
    for key in ("id", "type"):
        if piece.get(key) is not None:
            call[key] = piece[key]
    function = piece.get("function")
    if isinstance(function, dict):
        if function.get("name") is not None:
            call["function"]["name"] = function["name"]
        if isinstance(function.get("arguments"), str):
            call["function"]["arguments"] += function["arguments"]


def answer_chunks(answer: object, include_usage: bool) -> list[Chunk] | None:
    """A JSON chat answer as the chunks OpenAI would have streamed for it: per choice one with
    the whole message as its delta and one with its finish reason, then the usage chunk where
    the client asked for it (every chunk then says `"usage": null`, as OpenAI's do). None for
    what is not a chat answer."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return None
    base: dict[str, Any] = {"id": answer.get("id", ""), "object": "chat.completion.chunk",
                            "created": answer.get("created", 0), "model": answer.get("model", "")}
    if answer.get("system_fingerprint") is not None:
        base["system_fingerprint"] = answer["system_fingerprint"]
    if include_usage:
        base["usage"] = None
    chunks, finishes = [], []
    for position, choice in enumerate(answer["choices"]):
        if not isinstance(choice, dict):
            return None
        index = choice.get("index", position)
        message = choice.get("message")
        delta = {key: value for key, value in message.items() if value is not None} if isinstance(message, dict) else {}
        if isinstance(delta.get("tool_calls"), list):
            delta["tool_calls"] = [{"index": i, **call} if isinstance(call, dict) else call
                                   for i, call in enumerate(delta["tool_calls"])]
        chunks.append({**base, "choices": [{"index": index, "delta": delta, "logprobs": choice.get("logprobs"),
                                            "finish_reason": None}]})
        finishes.append({**base, "choices": [{"index": index, "delta": {}, "logprobs": None,
                                              "finish_reason": choice.get("finish_reason")}]})
    events = chunks + finishes
    if include_usage and answer.get("usage") is not None:
        events.append({**base, "choices": [], "usage": answer["usage"]})
    return events


def sse(chunks: list[Chunk]) -> bytes:
    """Chunks as OpenAI's server-sent events (without the final `[DONE]`)."""
    return b"".join(b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks)


class ChunkMaker:
    """The chunks a decoder makes, all with the stream's id, model and time of creation."""

    __slots__ = ("id", "model", "created")

    def __init__(self, id: str = "", model: str = "") -> None:
        self.id, self.model, self.created = id, model, int(time.time())

    def delta(self, delta: dict[str, Any], finish: str | None = None, index: int = 0) -> Chunk:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

    def usage(self, counted: dict[str, Any]) -> Chunk:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [], "usage": counted}


class StreamDecoder:
    """A provider's streamed answer read into OpenAI chunks, as its bytes arrive: what every
    provider's decoder keeps (the usage, the model, an error event's type, whether the stream
    got to its end) and does (`feed` a piece, `finish` at the end)."""

    def __init__(self) -> None:
        self.usage: dict[str, Any] | None = None  # OpenAI's shape, once the provider reported it
        self.model = ""  # the model the provider says answered
        self.error: str | None = None  # the type of an error event in the stream
        self.complete = False  # the provider's last event came

    def feed(self, data: bytes) -> list[Chunk]:
        raise NotImplementedError

    def finish(self) -> list[Chunk]:
        """What the end of the stream completes (an event without its blank line)."""
        return []


class OpenAIStreamDecoder(StreamDecoder):
    """An OpenAI-compatible provider's stream: its chunks as they are; usage, model and error
    events noted; complete at `[DONE]` (or a finish reason and its usage)."""

    def __init__(self) -> None:
        super().__init__()
        self._events = EventSplitter()
        self._finished = False

    def feed(self, data: bytes) -> list[Chunk]:
        return self._read(self._events.feed(data))

    def finish(self) -> list[Chunk]:
        return self._read(self._events.flush())

    def _read(self, events: list[Any]) -> list[Chunk]:
        out: list[Chunk] = []
        for event in events:
            if event.data == b"[DONE]":
                self.complete = True
                continue
            try:
                chunk = orjson.loads(event.data)
            except ValueError:
                continue
            if not isinstance(chunk, dict):
                continue
            error = chunk.get("error")
            if isinstance(error, dict) and not chunk.get("choices"):
                self.error = str(error.get("code") or error.get("type") or "error")
            if not self.model and chunk.get("model"):
                self.model = chunk["model"]
            if chunk.get("usage") is not None:
                self.usage = chunk["usage"]
            out.append(chunk)
        return out


class StreamEncoder:
    """Chunks written as the stream a client reads, as they come."""

    def encode(self, chunks: list[Chunk]) -> bytes:
        raise NotImplementedError

    def finish(self, complete: bool) -> bytes:
        """The end of the stream; where the provider's did not get to its end, an error event."""
        raise NotImplementedError


class OpenAIStreamEncoder(StreamEncoder):
    """Chunks as OpenAI's events: the usage chunk only where the client asked for it (every
    chunk then says `"usage": null`), an error event where the provider's stream failed,
    `data: [DONE]` after a complete stream."""

    def __init__(self, include_usage: bool) -> None:
        self._include_usage = include_usage
        self._failed = False

    def encode(self, chunks: list[Chunk]) -> bytes:
        out = []
        for chunk in chunks:
            if "error" in chunk and not chunk.get("choices"):
                self._failed = True
            elif "usage" in chunk and not chunk.get("choices"):  # the usage chunk
                if not self._include_usage:
                    continue
            elif self._include_usage:
                chunk = {**chunk, "usage": None}
            out.append(b"data: " + orjson.dumps(chunk) + b"\n\n")
        return b"".join(out)

    def finish(self, complete: bool) -> bytes:
        if self._failed:
            return b""
        if not complete:
            self._failed = True
            return self.encode([error_chunk(INCOMPLETE_MESSAGE, "server_error", INCOMPLETE_CODE)])
        return DONE
