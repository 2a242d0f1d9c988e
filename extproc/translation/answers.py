"""A provider's answer into the client's API: the decoder of the provider's API and the encoder of
the client's, through OpenAI's chunks and answers (`extproc.translation.openai_chunks`).

- `StreamTranslator`: a streamed answer translated piece by piece, as its bytes arrive (each of
  the provider's events becomes the client's as soon as it is whole), or, between clients and
  providers of one API other than OpenAI's, passed on unchanged while its usage is read;
- `translate_whole`: a whole answer: JSON to JSON, a stream into one JSON answer, JSON into a
  stream, an error answer into the client's error;
- `observe_whole`: a JSON answer passed on unchanged, its usage read.

Each reports the answer's usage in OpenAI's shape, its model and an error event's type: what the
exchange writes into the request's metadata for the access log, metrics and budgets (Envoy's own
readers know OpenAI's shapes only). Which of them an answer gets is decided by
`extproc.policy.answer_format.conversion`.
"""

from __future__ import annotations

import logging
from typing import Any, NamedTuple

import orjson

from ..policy.provider_api import ANTHROPIC, BEDROCK, GEMINI, OPENAI
from . import anthropic, bedrock, gemini
from .openai_chunks import (
    DONE,
    ChunkJoiner,
    OpenAIStreamDecoder,
    OpenAIStreamEncoder,
    StreamDecoder,
    StreamEncoder,
    answer_chunks,
    sse,
)

log = logging.getLogger(__name__)

EVENT_STREAM, JSON = "text/event-stream", "application/json"
OVERLOADED = 529  # Anthropic's "overloaded": a 503 to an OpenAI client


class Translated(NamedTuple):
    body: bytes
    content_type: str
    status: int | None  # a new status, or None to keep the provider's
    usage: dict[str, Any] | None  # OpenAI's shape
    model: str
    error: str | None  # an error event's type (the access log's stream_error)


def decoder_for(provider_api: str, model: str = "", answer_id: str = "") -> StreamDecoder:
    if provider_api == ANTHROPIC:
        return anthropic.AnthropicStreamDecoder()
    if provider_api == GEMINI:
        return gemini.GeminiStreamDecoder()
    if provider_api == BEDROCK:
        return bedrock.BedrockStreamDecoder(model, answer_id)
    return OpenAIStreamDecoder()


def encoder_for(client_api: str, include_usage: bool) -> StreamEncoder:
    if client_api == ANTHROPIC:
        return anthropic.AnthropicStreamEncoder()
    return OpenAIStreamEncoder(include_usage)


class StreamTranslator:
    """One streamed answer, translated (or, for one API on both sides, only read) as it comes."""

    __slots__ = ("decoder", "_encoder")

    def __init__(self, client_api: str, provider_api: str, include_usage: bool, model: str = "",
                 answer_id: str = "") -> None:
        self.decoder = decoder_for(provider_api, model, answer_id)
        # the same API on both sides: the answer passes unchanged, only its usage is read
        self._encoder = encoder_for(client_api, include_usage) if client_api != provider_api else None

    def feed(self, data: bytes) -> bytes:
        chunks = self.decoder.feed(data)
        return self._encoder.encode(chunks) if self._encoder is not None else data

    def finish(self) -> bytes:
        """The end of the provider's stream: what it completes, and the client's last events (an
        error event where the provider's stream ended before its last event)."""
        chunks = self.decoder.finish()
        if self._encoder is None:
            return b""
        return self._encoder.encode(chunks) + self._encoder.finish(self.decoder.complete)


def _decode_answer(provider_api: str, answer: Any, model: str, answer_id: str) -> dict[str, Any] | None:
    if provider_api == ANTHROPIC:
        return anthropic.answer_to_openai(answer)
    if provider_api == GEMINI:
        found = gemini.answer_to_openai(answer)
        if found is not None and not found["model"]:
            found["model"] = model
        return found
    if provider_api == BEDROCK:
        return bedrock.answer_to_openai(answer, model, answer_id)
    return answer if isinstance(answer, dict) and isinstance(answer.get("choices"), list) else None


def _openai_error(provider_api: str, status: int, body: bytes, error_kind: str) -> dict[str, Any]:
    try:
        parsed = orjson.loads(body) if body else None
    except ValueError:
        parsed = None
    if provider_api == ANTHROPIC:
        return anthropic.error_to_openai(status, parsed)
    if provider_api == GEMINI:
        return gemini.error_to_openai(status, parsed)
    if provider_api == BEDROCK:
        return bedrock.error_to_openai(status, parsed, error_kind)
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return parsed
    return {"error": {"message": "the provider failed", "type": "server_error", "code": str(status)}}


def translate_whole(client_api: str, provider_api: str, client_stream: bool, include_usage: bool, status: int,
                    content_type: str, body: bytes, model: str = "", answer_id: str = "",
                    error_kind: str = "") -> Translated | None:
    """A whole answer in the client's API and format (None: an answer that cannot be read, which
    the client then gets as the provider sent it). `model`: the request's, for APIs whose answer
    names none; `error_kind`: Bedrock's error type header."""
    if not 200 <= status < 300:
        error = _openai_error(provider_api, status, body, error_kind)
        if client_api == ANTHROPIC:
            return Translated(orjson.dumps(anthropic.error_to_anthropic(status, error)), JSON, None, None, "", None)
        return Translated(orjson.dumps(error), JSON, 503 if status == OVERLOADED else None, None, "", None)
    kind = content_type.split(";", 1)[0].strip().lower()
    if kind in (EVENT_STREAM, bedrock.EVENT_STREAM):  # a stream, into one answer
        decoder = decoder_for(provider_api, model, answer_id)
        joiner = ChunkJoiner()
        for chunk in [*decoder.feed(body), *decoder.finish()]:
            failed = joiner.add(chunk)
            if failed is not None and isinstance(failed["error"], dict):
                error_body = anthropic.error_to_anthropic(502, failed) if client_api == ANTHROPIC else failed
                return Translated(orjson.dumps(error_body), JSON, 502, decoder.usage, decoder.model,
                                  decoder.error or "error")
        if not joiner.seen:
            return None
        answer = joiner.answer()
        if not decoder.complete:
            message = "the provider's stream ended before it was complete"
            error_body = {"error": {"message": message, "type": "server_error", "code": "stream_incomplete"}}
            if client_api == ANTHROPIC:
                error_body = anthropic.error_to_anthropic(502, error_body)
            return Translated(orjson.dumps(error_body), JSON, 502, decoder.usage, decoder.model, "stream_incomplete")
        return _in_client_api(client_api, client_stream, include_usage, answer, decoder.model or model)
    try:
        parsed = orjson.loads(body)
    except ValueError:
        return None
    decoded = _decode_answer(provider_api, parsed, model, answer_id)
    if decoded is None:
        return None
    return _in_client_api(client_api, client_stream, include_usage, decoded, decoded.get("model") or model)


def _in_client_api(client_api: str, client_stream: bool, include_usage: bool, answer: dict[str, Any],
                   model: str) -> Translated | None:
    counted = answer.get("usage")
    if client_stream:
        chunks = answer_chunks(answer, include_usage or client_api != OPENAI)
        if chunks is None:
            return None
        if client_api == OPENAI:
            return Translated(sse(chunks) + DONE, EVENT_STREAM, None, counted, model, None)
        encoder = encoder_for(client_api, True)
        return Translated(encoder.encode(chunks) + encoder.finish(True), EVENT_STREAM, None, counted, model, None)
    if client_api == ANTHROPIC:
        message = anthropic.answer_to_anthropic(answer)
        if message is None:
            return None
        return Translated(orjson.dumps(message), JSON, None, counted, model, None)
    return Translated(orjson.dumps(answer), JSON, None, counted, model, None)


def observe_whole(provider_api: str, body: bytes) -> tuple[dict[str, Any] | None, str]:
    """A JSON answer's usage (OpenAI's shape) and model, read where it passes unchanged."""
    try:
        parsed = orjson.loads(body)
    except ValueError:
        return None, ""
    if not isinstance(parsed, dict):
        return None, ""
    if provider_api == ANTHROPIC:
        return anthropic.usage_to_openai(parsed.get("usage")), str(parsed.get("model") or "")
    if provider_api == GEMINI:
        return gemini.usage_to_openai(parsed.get("usageMetadata")), str(parsed.get("modelVersion") or "")
    if provider_api == BEDROCK:
        return bedrock.usage_to_openai(parsed.get("usage")), ""
    counted = parsed.get("usage")
    return (counted if isinstance(counted, dict) else None), str(parsed.get("model") or "")
