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
check of the answer's content) is one more function and one more entry in `CONVERTERS`; the
chunks are joined and split by `extproc.translation.openai_chunks`, which the translations
between provider APIs share (`extproc.translation.answers`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import orjson

from ..policy.answer_format import EVENT_STREAM, EVENTS_TO_JSON, JSON, JSON_TO_EVENTS, AnswerPlan
from ..translation.openai_chunks import DONE, ChunkJoiner, answer_chunks, sse

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
    chunks = answer_chunks(answer, plan.include_usage)
    if chunks is None:
        return None
    return Converted(sse(chunks) + DONE, EVENT_STREAM)


def _events(body: bytes) -> list[bytes]:
    """The data of each event of a server-sent-event body (its `data:` lines joined)."""
    out = []
    for block in body.replace(b"\r\n", b"\n").split(b"\n\n"):
        lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
        if lines:
            out.append(b"\n".join(lines))
    return out


def events_to_json(body: bytes, plan: AnswerPlan) -> Converted | None:
    """A chat answer's server-sent events as the one JSON answer OpenAI would have sent."""
    joiner = ChunkJoiner()
    for data in _events(body):
        if data == b"[DONE]":
            break
        try:
            event = orjson.loads(data)
        except ValueError:
            return None
        failed = joiner.add(event)
        if failed is not None:
            if not isinstance(failed["error"], dict):  # not a chunk
                return None
            return Converted(orjson.dumps(failed), JSON, STREAM_FAILED_STATUS)
    if not joiner.seen:
        return None
    return Converted(orjson.dumps(joiner.answer()), JSON)


CONVERTERS: dict[str, Converter] = {JSON_TO_EVENTS: json_to_events, EVENTS_TO_JSON: events_to_json}
