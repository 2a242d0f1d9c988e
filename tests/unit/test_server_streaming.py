"""The event-stream side of the ext_proc: a server-sent-event answer, chunk by chunk, as the second
ext_proc filter sends it (response headers, then body chunks). Chunks pass unchanged; the last
answer carries what was read as `llm_gateway` dynamic metadata."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format, struct_pb2

from extproc.names import METADATA_NAMESPACE
from extproc.routing import EMPTY_TABLE
from extproc.server import ExternalProcessor, TableHolder

MODEL = "qwen-turbo-2024-09-19"
STARTED = 1000.0


class Clock:
    """Time as the test says: `now` is set before each message is handed to the processor."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def event(data: dict | str) -> bytes:
    return b"data: " + (data if isinstance(data, str) else json.dumps(data)).encode() + b"\n\n"


def content(text: str) -> bytes:
    return event({"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
                  "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


ROLE = event({"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
              "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
FINISH = event({"id": "c1", "object": "chat.completion.chunk", "model": MODEL,
                "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
USAGE = event({"id": "c1", "object": "chat.completion.chunk", "model": MODEL, "choices": [],
               "usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}})
DONE = event("[DONE]")
HELLO = content("Hello")


def response_headers(meta: dict | None) -> pb.ProcessingRequest:
    request = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
    request.response_headers.headers.headers.add(key=":status", raw_value=b"200")
    request.response_headers.headers.headers.add(key="content-type", raw_value=b"text/event-stream")
    if meta is not None:
        request.metadata_context.filter_metadata[METADATA_NAMESPACE].update(meta)
    return request


def body(data: bytes, end: bool = False) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=data, end_of_stream=end))


def run(clock: Clock, *timed: tuple[float, pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    processor = ExternalProcessor(TableHolder(EMPTY_TABLE), draw=lambda: 0.0, clock=clock)

    exchange = processor.exchange()
    responses = []
    for at, message in timed:
        clock.now = at
        answers, done = exchange.on_message(message.SerializeToString())
        assert len(answers) == 1  # an answer's messages are each answered at once
        responses.append(pb.ProcessingResponse.FromString(answers[0]))
        if done:
            break
    return responses


def decision(**extra) -> dict:
    return {"route": "llm-route", "rule": "default", "provider": "dashscope", "provider_host": "dashscope.aliyuncs.com",
            "request_model": "qwen-turbo", "stream": True, "host": "llm.example", **extra}


def written(response: pb.ProcessingResponse) -> dict:
    """The `llm_gateway` dynamic metadata a response writes (empty if none)."""
    if METADATA_NAMESPACE not in response.dynamic_metadata.fields:
        return {}
    return json_format.MessageToDict(response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value)


def assert_passed_unchanged(responses: list[pb.ProcessingResponse], chunks: int) -> None:
    assert [r.WhichOneof("response") for r in responses] == ["response_headers"] + ["response_body"] * chunks
    assert responses[0] == pb.ProcessingResponse(response_headers=pb.HeadersResponse())
    for r in responses[1:]:
        common = r.response_body.response
        assert common.status == pb.CommonResponse.CONTINUE
        assert not common.HasField("body_mutation")
        assert not common.HasField("header_mutation")
        assert not r.HasField("mode_override") and not r.HasField("immediate_response")
    for r in responses[:-1]:
        assert not r.HasField("dynamic_metadata"), "metadata only with the last chunk"


def test_stream_read_as_it_passes():
    # the first content event ("Hello") is split across the first two chunks
    cut = len(HELLO) // 2
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.2, body(ROLE + HELLO[:cut])),
        (1000.25, body(HELLO[cut:] + content(" world"))),
        (1000.5, body(content("!") + content(" Bye"))),
        (1000.6, body(content(".") + FINISH + USAGE[:10])),
        (1000.75, body(USAGE[10:] + DONE, end=True)),
    )
    assert_passed_unchanged(responses, 5)
    assert written(responses[-1]) == {
        "response_model": MODEL, "prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17,
        "ttft_ms": pytest.approx(250.0),  # first content at 1000.25, request started at 1000.0
        "tpot_ms": pytest.approx(87.5),  # last content at 1000.6: (1000.6 - 1000.25) / (5 - 1)
    }
    # the metadata is a Struct of namespaces, the way Envoy's receiving_namespaces reads it
    assert list(responses[-1].dynamic_metadata.fields) == [METADATA_NAMESPACE]
    numbers = responses[-1].dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    for key in ("prompt_tokens", "completion_tokens", "total_tokens", "ttft_ms", "tpot_ms"):
        assert numbers[key].WhichOneof("kind") == "number_value", key


def test_first_token_time_taken_once():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.5, body(ROLE + HELLO)),
        (1001.5, body(content("again"))),
        (1002.5, body(USAGE + DONE, end=True)),
    )
    meta = written(responses[-1])
    assert meta["ttft_ms"] == pytest.approx(500.0)
    assert meta["tpot_ms"] == pytest.approx(1000.0 / 4)  # first token 1000.5, last 1001.5: the end is not a token


def test_no_usage_event_no_tokens():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.3, body(ROLE + HELLO)),
        (1000.9, body(content(" world") + FINISH + DONE, end=True)),
    )
    assert_passed_unchanged(responses, 2)
    assert written(responses[-1]) == {"response_model": MODEL, "ttft_ms": pytest.approx(300.0)}


def test_no_started_no_ttft():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision())),
        (1000.3, body(ROLE + HELLO)),
        (1000.7, body(content("!") + USAGE + DONE, end=True)),
    )
    assert_passed_unchanged(responses, 2)
    assert written(responses[-1]) == {"response_model": MODEL, "prompt_tokens": 12, "completion_tokens": 5,
                                      "total_tokens": 17, "tpot_ms": pytest.approx(100.0)}


def test_no_metadata_at_all():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(None)),
        (1000.3, body(ROLE + HELLO + USAGE + DONE, end=True)),
    )
    assert_passed_unchanged(responses, 1)
    meta = written(responses[-1])
    assert "ttft_ms" not in meta
    assert meta["completion_tokens"] == 5 and meta["tpot_ms"] == pytest.approx(0.0)  # first token at the end


def test_one_output_token_no_tpot():
    usage = event({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}})
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.2, body(HELLO)),
        (1000.4, body(usage + DONE, end=True)),
    )
    meta = written(responses[-1])
    assert meta["completion_tokens"] == 1 and "tpot_ms" not in meta
    assert meta["ttft_ms"] == pytest.approx(200.0)


def test_stream_error_event():
    error = event({"error": {"message": "The server had an error while processing your request.",
                             "type": "server_error", "param": None, "code": None}})
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.2, body(ROLE + HELLO)),
        (1000.3, body(error, end=True)),
    )
    assert_passed_unchanged(responses, 2)
    assert written(responses[-1]) == {"response_model": MODEL, "stream_error": "server_error",
                                      "ttft_ms": pytest.approx(200.0)}


def test_empty_last_chunk_carries_the_metadata():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.2, body(ROLE + HELLO + content("!") + USAGE + DONE)),
        (1000.6, body(b"", end=True)),
    )
    assert_passed_unchanged(responses, 2)
    meta = written(responses[-1])
    assert meta["completion_tokens"] == 5
    assert meta["ttft_ms"] == pytest.approx(200.0)
    assert meta["tpot_ms"] == pytest.approx(0.0)  # every token came in one chunk: no time between them


def test_usage_without_final_blank_line_still_read():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.2, body(ROLE + HELLO)),
        (1000.4, body(USAGE.rstrip(b"\n"), end=True)),
    )
    meta = written(responses[-1])
    assert (meta["prompt_tokens"], meta["completion_tokens"], meta["total_tokens"]) == (12, 5, 17)


def test_chunks_without_response_headers_pass():
    clock = Clock()
    responses = run(clock, (1000.0, body(HELLO)), (1000.1, body(USAGE, end=True)))
    assert [r.WhichOneof("response") for r in responses] == ["response_body", "response_body"]
    assert all(not r.HasField("dynamic_metadata") for r in responses)
    assert all(not r.response_body.response.HasField("body_mutation") for r in responses)


def test_started_from_the_request_side_struct():
    """`started` as the request side writes it (a Struct number) is what the stream side reads."""
    meta = struct_pb2.Struct()
    meta.update(decision())
    meta.fields["started"].number_value = STARTED
    request = pb.ProcessingRequest(response_headers=pb.HttpHeaders())
    request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(meta)
    clock = Clock()
    responses = run(clock, (1000.1, request), (1000.125, body(HELLO + DONE, end=True)))
    assert written(responses[-1])["ttft_ms"] == pytest.approx(125.0)


def test_content_event_completed_only_at_the_end_still_times_the_first_token():
    clock = Clock()
    responses = run(
        clock,
        (1000.1, response_headers(decision(started=STARTED))),
        (1000.4, body(HELLO.rstrip(b"\n"), end=True)),  # the only content event, without its blank line
    )
    assert written(responses[-1])["ttft_ms"] == pytest.approx(400.0)
