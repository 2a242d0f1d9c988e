"""The answer's exchange, message by message as Envoy's answer filter sends them: the headers
decide (the client's ask from the decision's metadata, the answer's status and content type),
then the whole body comes back converted, with its new content type and length; everything else
passes with no body asked for, and the stream counts as open until it ends. An answer a data
policy checks comes piece by piece (a stream the client reads as one) or whole, checked."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.dataplane.answer_check import AnswerGuards
from extproc.dataplane.answer_exchange import AnswerProcessor
from extproc.dataplane.data_protection import ProtectionMetrics
from extproc.policy.body_memory import Inflight
from extproc.policy.table import TableHolder

JSON_ANSWER = {"id": "c1", "object": "chat.completion", "created": 1, "model": "m",
               "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi"}, "finish_reason": "stop"}],
               "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def headers(status: int, content_type: str, asked: dict | None) -> bytes:
    message = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=str(status).encode()),
        base_pb2.HeaderValue(key="content-type", raw_value=content_type.encode())])))
    if asked is not None:
        message.metadata_context.filter_metadata["llm_gateway"].update({"route": "default/r", **asked})
    return message.SerializeToString()


def body(data: bytes) -> bytes:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=True)).SerializeToString()


def answer(raw: list[bytes]) -> pb.ProcessingResponse:
    (one,) = raw
    return pb.ProcessingResponse.FromString(one)


@pytest.mark.parametrize(("status", "content_type", "asked"), [
    pytest.param(429, "application/json", {"client_stream": True}, id="error"),
    pytest.param(200, "text/event-stream", {"client_stream": True}, id="already-a-stream"),
    pytest.param(200, "application/json", {"client_stream": False}, id="already-json"),
    pytest.param(200, "application/json", None, id="no-ask-in-the-metadata"),
])
def test_an_answer_already_right_passes_without_its_body(status, content_type, asked):
    inflight = Inflight()
    exchange = AnswerProcessor(inflight).exchange()
    assert inflight.streams == 1
    raw, done = exchange.on_message(headers(status, content_type, asked))
    response = answer(raw)
    assert done and response.WhichOneof("response") == "response_headers"
    assert not response.response_headers.response.HasField("header_mutation")
    # no body asked for: every mode back to its default, response_body_mode NONE
    assert response.HasField("mode_override") and response.mode_override.response_body_mode == 0
    exchange.on_close()
    exchange.on_close()  # however often the server says so
    assert inflight.streams == 0


def test_a_json_answer_reaches_a_streaming_client_as_events():
    exchange = AnswerProcessor().exchange()
    raw, done = exchange.on_message(headers(200, "application/json", {"client_stream": True, "include_usage": True}))
    assert not done and not answer(raw).HasField("mode_override")  # the body comes next, whole
    raw, done = exchange.on_message(body(json.dumps(JSON_ANSWER).encode()))
    common = answer(raw).response_body.response
    assert done
    values = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    new_body = common.body_mutation.body
    assert values == {"content-type": "text/event-stream", "content-length": str(len(new_body))}
    assert new_body.endswith(b"data: [DONE]\n\n") and b'"usage":{"prompt_tokens":1' in new_body


def test_an_error_event_sets_the_status():
    exchange = AnswerProcessor().exchange()
    exchange.on_message(headers(200, "text/event-stream", {"client_stream": False}))
    raw, done = exchange.on_message(body(b'data: {"error": {"message": "m", "type": "server_error"}}\n\n'))
    values = {o.header.key: o.header.raw_value.decode()
              for o in answer(raw).response_body.response.header_mutation.set_headers}
    assert done and values[":status"] == "502" and values["content-type"] == "application/json"


def test_an_unreadable_answer_is_passed_on_unchanged():
    exchange = AnswerProcessor().exchange()
    exchange.on_message(headers(200, "application/json", {"client_stream": True}))
    raw, done = exchange.on_message(body(b"<html>not json</html>"))
    response = answer(raw)
    assert done and response.WhichOneof("response") == "response_body"
    assert not response.response_body.response.HasField("body_mutation")
    assert not response.response_body.response.HasField("header_mutation")


def test_an_answer_without_a_body_passes():
    message = pb.ProcessingRequest.FromString(headers(200, "application/json", {"client_stream": True}))
    message.response_headers.end_of_stream = True
    raw, done = AnswerProcessor().exchange().on_message(message.SerializeToString())
    assert done and answer(raw).HasField("mode_override")


# --- answers a data policy checks (`responses.check`; extproc.dataplane.answer_check) -----------

CHECKED_CONFIG = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: r}
spec:
  host: provider.example.com
  configs: {defaultConfig: {openAIConfig: {model: m, apiKey: sk-inline}}}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: p}
spec:
  rules:
  - {name: cards, detectors: [{builtin: bank-card}], action: mask}
  - {name: keys, detectors: [{builtin: secret}], action: block}
  responses: {check: true}
"""
CARD, SECRET = "4111 1111 1111 1111", "sk-live-0123456789abcdefABCDEF0123"


def checking(config: str = CHECKED_CONFIG) -> tuple[AnswerProcessor, CollectorRegistry]:
    objects, problems = load_text(config, "c.yaml")
    assert problems == []
    registry = CollectorRegistry()
    guards = AnswerGuards(TableHolder(compile_config(objects).table), ProtectionMetrics(registry))
    return AnswerProcessor(guards=guards), registry


def checked_headers(status: int, content_type: str, client_stream: bool) -> bytes:
    return headers(status, content_type, {"client_stream": client_stream, "check_answer": True})


def chunk(data: bytes, last: bool) -> bytes:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=last)).SerializeToString()


def sse(text: str, finish: str | None = None) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text},
                                                "finish_reason": finish}]}).encode() + b"\n\n"


def test_a_checked_stream_comes_piece_by_piece_and_each_piece_goes_back_checked():
    processor, registry = checking()
    exchange = processor.exchange()
    raw, done = exchange.on_message(checked_headers(200, "text/event-stream", True))
    response = answer(raw)
    assert not done and response.mode_override.response_body_mode == ProcessingMode.STREAMED
    assert list(response.response_headers.response.header_mutation.remove_headers) == ["content-length"]
    pieces = [sse(w + " ") for w in f"{'x ' * 60}card {CARD} ok".split()] + [sse("", "stop"), b"data: [DONE]\n\n"]
    out = b""
    for i, piece in enumerate(pieces):
        raw, done = exchange.on_message(chunk(piece, i == len(pieces) - 1))
        assert done is (i == len(pieces) - 1)
        common = answer(raw).response_body.response
        assert common.body_mutation.HasField("body") and not common.HasField("header_mutation")
        out += common.body_mutation.body
    assert b"[BANK-CARD]" in out and b"4111" not in out and out.endswith(b"data: [DONE]\n\n")
    exchange.on_close()
    assert {tuple(sorted(s.labels.items())): s.value for f in registry.collect() for s in f.samples
            if s.name == "llm_gateway_data_policy_answers_total"} == {
        (("action", "mask"), ("policy", "default/p"), ("rule", "cards")): 1.0}


@pytest.mark.parametrize(("content_type", "client_stream", "reply", "status", "expected_type"), [
    pytest.param("application/json", False, f"card {CARD}", None, "application/json", id="json-masked"),
    pytest.param("application/json", False, SECRET, "400", "application/json", id="json-withheld"),
    pytest.param("application/json", True, f"card {CARD}", None, "text/event-stream", id="checked-then-converted"),
    pytest.param("application/json", True, SECRET, "400", "application/json", id="withheld-before-converting"),
    pytest.param("text/event-stream", False, f"card {CARD}", None, "application/json", id="converted-then-checked"),
    pytest.param("text/event-stream", False, SECRET, "400", "application/json", id="converted-then-withheld"),
])
def test_a_checked_answer_read_whole(content_type, client_stream, reply, status, expected_type):
    exchange = checking()[0].exchange()
    raw, done = exchange.on_message(checked_headers(200, content_type, client_stream))
    assert not done and not answer(raw).HasField("mode_override")  # the body comes next, whole
    if content_type == "application/json":
        sent = json.dumps({**JSON_ANSWER, "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                                       "finish_reason": "stop"}]}).encode()
    else:
        sent = b"".join(sse(w + " ") for w in reply.split()) + sse("", "stop") + b"data: [DONE]\n\n"
    raw, done = exchange.on_message(body(sent))
    common = answer(raw).response_body.response
    values = {o.header.key: o.header.raw_value.decode() for o in common.header_mutation.set_headers}
    new_body = common.body_mutation.body
    assert done and values.get(":status") == status and values["content-type"] == expected_type
    assert values["content-length"] == str(len(new_body))
    assert b"4111" not in new_body and SECRET.encode() not in new_body
    if status is None:
        assert b"[BANK-CARD]" in new_body
    else:
        assert json.loads(new_body)["error"]["code"] == "content_policy_violation"


@pytest.mark.parametrize(("status", "content_type", "config"), [
    pytest.param(500, "application/json", CHECKED_CONFIG, id="an-error-passes"),
    pytest.param(200, "text/plain", CHECKED_CONFIG, id="not-a-models-answer"),
    pytest.param(200, "application/json", CHECKED_CONFIG.replace("  responses: {check: true}\n", ""),
                 id="the-policy-no-longer-checks-answers"),
])
def test_a_marked_answer_nothing_checks_passes_without_its_body(status, content_type, config):
    raw, done = checking(config)[0].exchange().on_message(checked_headers(status, content_type, False))
    response = answer(raw)
    assert done and response.HasField("mode_override") and response.mode_override.response_body_mode == 0


# --- across APIs (docs/translation.md) ---------------------------------------------------------------

def piece(data: bytes, last: bool = False) -> bytes:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=last)).SerializeToString()


def usage_of(response: pb.ProcessingResponse) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response.dynamic_metadata).get("llm_gateway", {})


def test_a_translated_stream_goes_piece_by_piece_with_its_usage_at_the_end():
    from support.api_shapes import ANTHROPIC_STREAM

    exchange = AnswerProcessor(Inflight()).exchange()
    raw, done = exchange.on_message(headers(200, "text/event-stream", {
        "client_stream": True, "include_usage": False, "provider_api": "anthropic", "request_model": "claude"}))
    response = answer(raw)
    assert not done
    from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode

    assert response.mode_override.response_body_mode == ProcessingMode.STREAMED  # the pieces, as they arrive
    mutation = response.response_headers.response.header_mutation
    assert [(o.header.key, o.header.raw_value) for o in mutation.set_headers] == [("content-type",
                                                                                  b"text/event-stream")]
    assert list(mutation.remove_headers) == ["content-length"]
    out, ends = b"", []
    middle = len(ANTHROPIC_STREAM) // 2
    for data, last in ((ANTHROPIC_STREAM[:10], False), (ANTHROPIC_STREAM[10:middle], False),
                       (ANTHROPIC_STREAM[middle:], False), (b"", True)):
        raw, done = exchange.on_message(piece(data, last))
        ends.append(done)
        response = answer(raw)
        mutation = response.response_body.response.body_mutation
        out += mutation.body
        if data[:10] == ANTHROPIC_STREAM[:10] and len(data) == 10:  # not one whole event yet: nothing to send
            assert mutation.clear_body
    assert ends == [False, False, False, True]
    chunks = [json.loads(e[6:]) for e in out.decode().split("\n\n") if e and e != "data: [DONE]"]
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == "Hello!"
    assert out.endswith(b"data: [DONE]\n\n")
    assert usage_of(response) == {"prompt_tokens": 30.0, "completion_tokens": 15.0, "total_tokens": 45.0,
                                  "cached_tokens": 5.0, "response_model": "claude-sonnet-4-5"}


def test_the_same_api_on_both_sides_passes_unchanged_and_its_usage_is_read():
    from support.api_shapes import ANTHROPIC_STREAM

    exchange = AnswerProcessor(Inflight()).exchange()
    response = answer(exchange.on_message(headers(200, "text/event-stream", {
        "client_stream": True, "client_api": "anthropic", "provider_api": "anthropic"}))[0])
    assert not response.response_headers.response.header_mutation.set_headers  # its own content type
    first = answer(exchange.on_message(piece(ANTHROPIC_STREAM[:-5]))[0])
    assert not first.response_body.response.HasField("body_mutation")  # passed as it came
    last = answer(exchange.on_message(piece(ANTHROPIC_STREAM[-5:], True))[0])
    assert usage_of(last)["completion_tokens"] == 15.0


def test_a_stream_that_ends_early_is_marked_in_the_metadata():
    exchange = AnswerProcessor(Inflight()).exchange()
    exchange.on_message(headers(200, "text/event-stream", {"client_stream": True, "provider_api": "gemini"}))
    response = answer(exchange.on_message(piece(b'data: {"candidates": [{"content": {"parts": [{"text": "Hi"}]}}]}\n\n',
                                                True))[0])
    assert b"stream_incomplete" in response.response_body.response.body_mutation.body
    assert usage_of(response)["stream_error"] == "stream_incomplete"


def test_a_whole_answer_translated_with_its_usage_and_an_error_in_the_clients_shape():
    from support.api_shapes import ANTHROPIC_MESSAGE

    exchange = AnswerProcessor(Inflight()).exchange()
    assert answer(exchange.on_message(headers(200, "application/json", {
        "client_stream": False, "provider_api": "anthropic"}))[0]).WhichOneof("response") == "response_headers"
    response = answer(exchange.on_message(body(json.dumps(ANTHROPIC_MESSAGE).encode()))[0])
    converted = json.loads(response.response_body.response.body_mutation.body)
    assert converted["choices"][0]["message"]["content"] == "Hi! My name is Claude."
    assert usage_of(response)["prompt_tokens"] == 2095.0

    exchange = AnswerProcessor(Inflight()).exchange()
    exchange.on_message(headers(429, "application/json", {"client_stream": True, "client_api": "anthropic"}))
    response = answer(exchange.on_message(body(b'{"error": {"message": "slow down", "type": "x", "code": "y"}}'))[0])
    assert json.loads(response.response_body.response.body_mutation.body) == {
        "type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}


def test_an_error_event_goes_into_the_metadata_at_once():
    """The client may hang up when it reads the error event: the log must not wait for the end."""
    exchange = AnswerProcessor(Inflight()).exchange()
    exchange.on_message(headers(200, "text/event-stream", {"client_stream": True, "provider_api": "anthropic"}))
    error = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "x"}}\n\n'
    response = answer(exchange.on_message(piece(error))[0])
    assert usage_of(response) == {"stream_error": "overloaded_error"}


# --- across APIs and checked: translated into OpenAI's, then checked ---------------------------------

def anthropic_events(text: str) -> bytes:
    events = [("message_start", {"type": "message_start", "message": {
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5", "content": [],
        "stop_reason": None, "usage": {"input_tokens": 10, "output_tokens": 1}}}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}})]
    events += [("content_block_delta", {"type": "content_block_delta", "index": 0,
                                        "delta": {"type": "text_delta", "text": w + " "}}) for w in text.split()]
    events += [("content_block_stop", {"type": "content_block_stop", "index": 0}),
               ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"},
                                  "usage": {"output_tokens": 7}}),
               ("message_stop", {"type": "message_stop"})]
    return b"".join(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode() for name, data in events)


@pytest.mark.parametrize("reply", [f"card {CARD} ok", f"key {SECRET} here"], ids=["masked", "blocked"])
def test_a_translated_stream_is_checked_as_openais_piece_by_piece(reply):
    processor, registry = checking()
    exchange = processor.exchange()
    response = answer(exchange.on_message(headers(200, "text/event-stream", {
        "client_stream": True, "check_answer": True, "provider_api": "anthropic", "route": "default/r"}))[0])
    assert response.mode_override.response_body_mode == ProcessingMode.STREAMED
    stream = anthropic_events(reply)
    out, metadata = b"", {}
    for i in range(0, len(stream), 40):
        last = i + 40 >= len(stream)
        response = answer(exchange.on_message(piece(stream[i:i + 40], last))[0])
        out += response.response_body.response.body_mutation.body
        metadata.update(usage_of(response))
    exchange.on_close()
    assert b"4111" not in out and SECRET.encode() not in out
    if "card" in reply:
        assert b"[BANK-CARD]" in out and out.endswith(b"data: [DONE]\n\n")
        assert metadata["completion_tokens"] == 7.0  # the usage still read beside the policy's entry
        assert metadata["data_answer"]["action"] == "mask"
    else:
        assert b"content_filter" in out and b"content_policy_violation" in out
        assert metadata["data_answer"]["action"] == "block"


def test_a_translated_whole_answer_is_checked_as_openais():
    from support.api_shapes import ANTHROPIC_MESSAGE

    exchange = checking()[0].exchange()
    exchange.on_message(headers(200, "application/json", {
        "client_stream": False, "check_answer": True, "provider_api": "anthropic", "route": "default/r"}))
    message = {**ANTHROPIC_MESSAGE, "content": [{"type": "text", "text": f"card {CARD}"}]}
    response = answer(exchange.on_message(body(json.dumps(message).encode()))[0])
    converted = json.loads(response.response_body.response.body_mutation.body)
    assert converted["choices"][0]["message"]["content"] == "card [BANK-CARD]"
    assert usage_of(response)["prompt_tokens"] == 2095.0 and usage_of(response)["data_answer"]["action"] == "mask"
