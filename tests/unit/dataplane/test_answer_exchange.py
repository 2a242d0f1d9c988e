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
