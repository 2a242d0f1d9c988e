"""Converters of a whole answer into the client's format: one per conversion that
`extproc.policy.answer_format.conversion` can name, in `CONVERTERS`. Pure functions of the
answer's bytes and what the client asked for.

- one JSON chat answer -> server-sent events, as OpenAI streams it: per choice a chunk with the
  whole message as its delta, then one with its finish reason, the usage chunk where the client
  asked for it (`stream_options.include_usage`; every chunk then carries `"usage": null`, as
  OpenAI's do), and `data: [DONE]`;
- server-sent events -> one JSON chat answer: the deltas joined per choice (content, refusal,
  reasoning, tool calls by index), the finish reasons, the usage event; an error event becomes
  the JSON error it reports, with a 502.

A converter returns None for an answer it cannot read (not JSON, not a chat answer): the answer
then reaches the client as the provider sent it. Another conversion (another provider API, a
check of the answer's content) is one more function and one more entry in `CONVERTERS`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from ..policy.answer_format import EVENT_STREAM, EVENTS_TO_JSON, JSON, JSON_TO_EVENTS, AnswerPlan

DONE = b"data: [DONE]\n\n"
STREAM_FAILED_STATUS = 502  # an error event in a stream the client wanted as one JSON answer


class Converted(NamedTuple):
    body: bytes
    content_type: str
    status: int | None = None  # a new status, or None to keep the provider's


Converter = Callable[[bytes, AnswerPlan], "Converted | None"]


def json_to_events(body: bytes, plan: AnswerPlan) -> Converted | None:
    """A JSON chat answer as the server-sent events OpenAI would have streamed for it."""
    try:
        answer = orjson.loads(body)
    except ValueError:
        return None
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list):
        return None
    base: dict[str, Any] = {"id": answer.get("id", ""), "object": "chat.completion.chunk",
                            "created": answer.get("created", 0), "model": answer.get("model", "")}
    if answer.get("system_fingerprint") is not None:
        base["system_fingerprint"] = answer["system_fingerprint"]
    if plan.include_usage:
        base["usage"] = None  # OpenAI's chunks say so when the usage chunk is to come
    chunks = []
    finishes = []
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
    if plan.include_usage and answer.get("usage") is not None:
        events.append({**base, "choices": [], "usage": answer["usage"]})
    return Converted(b"".join(b"data: " + orjson.dumps(event) + b"\n\n" for event in events) + DONE, EVENT_STREAM)


def _events(body: bytes) -> list[bytes]:
    """The data of each event of a server-sent-event body (its `data:` lines joined)."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines))
    return out


_JOINED = ("content", "refusal", "reasoning_content")  # text fields a stream sends in pieces


def events_to_json(body: bytes, plan: AnswerPlan) -> Converted | None:
    """A chat answer's server-sent events as the one JSON answer OpenAI would have sent."""
    head: dict[str, Any] = {}
    usage = None
    choices: dict[int, dict[str, Any]] = {}
    texts: dict[tuple[int, str], list[str]] = {}
    calls: dict[int, dict[int, dict[str, Any]]] = {}
    seen = False
    for data in _events(body):
        if data == b"[DONE]":
            break
        try:
            event = orjson.loads(data)
        except ValueError:
            return None
        if not isinstance(event, dict):
            return None
        if isinstance(event.get("error"), dict) and not event.get("choices"):
            failed = orjson.dumps({"error": event["error"]})
            return Converted(failed, JSON, STREAM_FAILED_STATUS)
        seen = True
        for key in ("id", "created", "model", "system_fingerprint"):
            if key not in head and event.get(key) is not None:
                head[key] = event[key]
        if event.get("usage") is not None:
            usage = event["usage"]
        for choice in event.get("choices") or ():
            if not isinstance(choice, dict):
                return None
            index = choice.get("index", 0)
            merged = choices.setdefault(index, {"index": index, "message": {"role": "assistant", "content": None},
                                                "logprobs": None, "finish_reason": None})
            delta = choice.get("delta") or {}
            if delta.get("role"):
                merged["message"]["role"] = delta["role"]
            for field in _JOINED:
                if isinstance(delta.get(field), str):
                    texts.setdefault((index, field), []).append(delta[field])
            for call in delta.get("tool_calls") or ():
                _merge_call(calls.setdefault(index, {}), call)
            if choice.get("finish_reason") is not None:
                merged["finish_reason"] = choice["finish_reason"]
            logprobs = choice.get("logprobs")
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                merged["logprobs"] = merged["logprobs"] or {"content": []}
                merged["logprobs"]["content"].extend(logprobs["content"])
    if not seen:
        return None
    for (index, field), parts in texts.items():
        choices[index]["message"][field] = "".join(parts)
    for index, by_position in calls.items():
        choices[index]["message"]["tool_calls"] = [by_position[i] for i in sorted(by_position)]
    answer: dict[str, Any] = {"id": head.get("id", ""), "object": "chat.completion",
                              "created": head.get("created", 0), "model": head.get("model", ""),
                              "choices": [choices[i] for i in sorted(choices)]}
    if "system_fingerprint" in head:
        answer["system_fingerprint"] = head["system_fingerprint"]
    if usage is not None:
        answer["usage"] = usage
    return Converted(orjson.dumps(answer), JSON)


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


CONVERTERS: dict[str, Converter] = {JSON_TO_EVENTS: json_to_events, EVENTS_TO_JSON: events_to_json}
