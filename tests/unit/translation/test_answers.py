"""Every pair of client API (OpenAI's, Anthropic's) and provider API (OpenAI's, Anthropic's, Gemini's,
Bedrock's), streamed and not, from recorded answers: the client reads its own API's answer with
the provider's text, and the usage reported is the provider's, exactly; a stream is translated
as it comes, whatever its chunks; errors reach the client in its API's shape and status."""

from __future__ import annotations

import json

import pytest
from anthropic.types import Message

from extproc.demo.fake_apis import frame
from extproc.translation import anthropic
from extproc.translation.answers import StreamTranslator, observe_whole, translate_whole
from extproc.translation.openai_chunks import DONE, OpenAIStreamEncoder, answer_chunks, sse
from support.anthropic_sdk import sdk_message
from support.api_shapes import (
    ANTHROPIC_ERROR,
    ANTHROPIC_MESSAGE,
    ANTHROPIC_STREAM,
    CONVERSE_ANSWER,
    GEMINI_ANSWER,
    GEMINI_ERROR,
    GEMINI_STREAM,
)

OPENAI_ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen-plus",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi from OpenAI."},
                              "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}}
BEDROCK_STREAM = b"".join([
    frame("messageStart", {"role": "assistant"}),
    frame("contentBlockDelta", {"delta": {"text": "Hi from "}, "contentBlockIndex": 0}),
    frame("contentBlockDelta", {"delta": {"text": "Bedrock."}, "contentBlockIndex": 0}),
    frame("contentBlockStop", {"contentBlockIndex": 0}),
    frame("messageStop", {"stopReason": "end_turn"}),
    frame("metadata", {"usage": {"inputTokens": 9, "outputTokens": 3, "totalTokens": 12}})])
OPENAI_STREAM = sse(answer_chunks(OPENAI_ANSWER, True)) + DONE

# provider API -> (its JSON answer, its stream, the stream's content type, the text, the usage it reports)
PROVIDERS = {
    "openai": (OPENAI_ANSWER, OPENAI_STREAM, "text/event-stream", "Hi from OpenAI.", (11, 3)),
    "anthropic": (ANTHROPIC_MESSAGE, ANTHROPIC_STREAM, "text/event-stream", None, None),
    "gemini": (GEMINI_ANSWER, GEMINI_STREAM, "text/event-stream", None, None),
    "bedrock": ({**CONVERSE_ANSWER, "output": {"message": {"role": "assistant", "content": [
        {"text": "Hi from Bedrock."}]}}, "stopReason": "end_turn"}, BEDROCK_STREAM,
        "application/vnd.amazon.eventstream", "Hi from Bedrock.", (9, 3)),
}
JSON_TEXT = {"openai": "Hi from OpenAI.", "anthropic": "Hi! My name is Claude.",
             "gemini": "Hello there! How can I help?", "bedrock": "Hi from Bedrock."}
JSON_USAGE = {"openai": (11, 3), "anthropic": (2095, 503), "gemini": (8, 13), "bedrock": (40, 20)}
STREAM_TEXT = {"openai": "Hi from OpenAI.", "anthropic": "Hello!", "gemini": "The sky is blue.",
               "bedrock": "Hi from Bedrock."}
STREAM_USAGE = {"openai": (11, 3), "anthropic": (30, 15), "gemini": (8, 5), "bedrock": (9, 3)}
PAIRS = [(client, provider) for client in ("openai", "anthropic") for provider in PROVIDERS
         if (client, provider) != ("openai", "openai")]


def client_text(client: str, body: bytes, streamed: bool) -> str:
    if not streamed:
        answer = json.loads(body)
        if client == "anthropic":
            return "".join(b.text for b in Message.model_validate(answer).content if b.type == "text")
        return answer["choices"][0]["message"]["content"]
    if client == "anthropic":
        message, _ = sdk_message(body)
        return "".join(b.text for b in message.content if b.type == "text")
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in map(lambda e: json.loads(e[6:]), events[:-1])
                   if c.get("choices"))


def tokens(counted) -> tuple[int, int]:
    return counted["prompt_tokens"], counted["completion_tokens"]


@pytest.mark.parametrize(("client", "provider"), [p for p in PAIRS if p[0] != p[1]])
@pytest.mark.parametrize("client_stream", [False, True])
def test_a_json_answer_in_the_clients_api(client, provider, client_stream):
    answer = PROVIDERS[provider][0]
    out = translate_whole(client, provider, client_stream, True, 200, "application/json",
                          json.dumps(answer).encode(), "req-model")
    assert out is not None and out.status is None
    assert out.content_type == ("text/event-stream" if client_stream else "application/json")
    assert client_text(client, out.body, client_stream) == JSON_TEXT[provider]
    assert tokens(out.usage) == JSON_USAGE[provider]


@pytest.mark.parametrize(("client", "provider"), [p for p in PAIRS if p[0] != p[1]])
def test_a_stream_as_one_answer_in_the_clients_api(client, provider):
    _, stream, content_type, _, _ = PROVIDERS[provider]
    out = translate_whole(client, provider, False, False, 200, content_type, stream, "req-model")
    assert out is not None and out.content_type == "application/json"
    assert client_text(client, out.body, False) == STREAM_TEXT[provider]
    assert tokens(out.usage) == STREAM_USAGE[provider]


@pytest.mark.parametrize(("client", "provider"), PAIRS)
@pytest.mark.parametrize("piece", [1, 37, 100_000])
def test_a_stream_translated_as_it_comes(client, provider, piece):
    _, stream, _, _, _ = PROVIDERS[provider]
    translator = StreamTranslator(client, provider, True, "req-model")
    out = b"".join(translator.feed(stream[i:i + piece]) for i in range(0, len(stream), piece)) + translator.finish()
    if client == provider:  # one API on both sides: passed on as it came, its usage read
        assert out == stream
    else:
        assert client_text(client, out, True) == STREAM_TEXT[provider]
    assert tokens(translator.decoder.usage) == STREAM_USAGE[provider] and translator.decoder.complete


def test_the_usage_chunk_only_where_the_openai_client_asked_for_it():
    for include_usage in (True, False):
        translator = StreamTranslator("openai", "anthropic", include_usage)
        out = translator.feed(ANTHROPIC_STREAM) + translator.finish()
        chunks = [json.loads(e[6:]) for e in out.decode().split("\n\n") if e and e != "data: [DONE]"]
        assert any("usage" in c and c["usage"] for c in chunks) is include_usage
        assert tokens(translator.decoder.usage) == (30, 15)  # counted either way


@pytest.mark.parametrize(("provider", "status", "body", "code"), [
    ("anthropic", 429, ANTHROPIC_ERROR, "rate_limit_error"),
    ("gemini", 400, GEMINI_ERROR, "INVALID_ARGUMENT"),
    ("bedrock", 403, {"message": "The security token included in the request is invalid."},
     "UnrecognizedClientException"),
])
def test_a_providers_error_as_openais(provider, status, body, code):
    out = translate_whole("openai", provider, True, False, status, "application/json", json.dumps(body).encode(),
                          error_kind="UnrecognizedClientException:http://x")
    error = json.loads(out.body)["error"]
    assert out.status is None and error["code"] == code and error["message"]  # the provider's status is kept
    assert out.content_type == "application/json"  # a streaming client gets the JSON error, as OpenAI sends it


def test_an_overloaded_anthropic_is_a_503_for_openai_clients_and_errors_are_anthropics_for_its_clients():
    out = translate_whole("openai", "anthropic", False, False, 529, "application/json",
                          b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}')
    assert out.status == 503
    out = translate_whole("anthropic", "openai", False, False, 404, "application/json",
                          b'{"error":{"message":"no such model","type":"invalid_request_error","code":"x"}}')
    assert json.loads(out.body) == {"type": "error", "error": {"type": "not_found_error", "message": "no such model"}}


def test_an_error_event_and_an_incomplete_stream_become_a_502_for_a_json_client():
    error = b'event: error\ndata: {"type": "error", "error": {"type": "api_error", "message": "boom"}}\n\n'
    ends = [i + 2 for i in range(len(ANTHROPIC_STREAM)) if ANTHROPIC_STREAM.startswith(b"\n\n", i)]
    out = translate_whole("openai", "anthropic", False, False, 200, "text/event-stream",
                          ANTHROPIC_STREAM[:ends[3]] + error)
    assert out.status == 502 and json.loads(out.body)["error"]["message"] == "boom" and out.error == "api_error"
    cut = ANTHROPIC_STREAM[:ANTHROPIC_STREAM.index(b"event: message_delta")]
    out = translate_whole("anthropic", "anthropic", False, False, 200, "text/event-stream", cut)
    assert out.status == 502 and out.error == "stream_incomplete"
    assert json.loads(out.body)["error"]["type"] == "api_error"


def test_an_unreadable_answer_is_left_as_it_is():
    assert translate_whole("openai", "gemini", False, False, 200, "application/json", b"<html>") is None
    assert translate_whole("openai", "gemini", False, False, 200, "application/json", b'{"x": 1}') is None


def test_observed_usage_of_an_answer_passed_on():
    assert observe_whole("anthropic", json.dumps(ANTHROPIC_MESSAGE).encode()) == (
        anthropic.usage_to_openai(ANTHROPIC_MESSAGE["usage"]), "claude-sonnet-4-5")
    assert observe_whole("anthropic", b"not json") == (None, "")


def test_the_openai_encoder_ends_a_cut_stream_with_an_error_and_no_done():
    encoder = OpenAIStreamEncoder(False)
    body = encoder.encode(answer_chunks(OPENAI_ANSWER, False)[:1]) + encoder.finish(False)
    assert b"[DONE]" not in body and b'"code":"stream_incomplete"' in body
