"""The answer's exchange, message by message as Envoy's answer filter sends them: the headers
decide (the client's ask from the decision's metadata, the answer's status and content type),
then the whole body comes back converted, with its new content type and length; everything else
passes with no body asked for, and the stream counts as open until it ends."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.dataplane.answer_exchange import AnswerProcessor
from extproc.policy.body_memory import Inflight

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
