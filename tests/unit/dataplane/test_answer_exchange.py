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
