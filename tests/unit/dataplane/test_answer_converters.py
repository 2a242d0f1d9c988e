"""Converting a whole answer into the client's format: a JSON chat answer as OpenAI's chunks (and
back), server-sent events as one JSON answer, tool calls, usage only where asked, error events,
and answers a converter cannot read passed on as they are."""

from __future__ import annotations

import json

import pytest

from extproc.dataplane.answer_converters import (
    CONVERTERS,
    STREAM_FAILED_STATUS,
    events_to_json,
    json_to_events,
)
from extproc.policy.answer_format import EVENTS_TO_JSON, JSON_TO_EVENTS, AnswerPlan

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
ANSWER = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1700000000, "model": "m-1",
          "system_fingerprint": "fp-1",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi there, friend."},
                       "logprobs": None, "finish_reason": "stop"}],
          "usage": USAGE}
TOOL_ANSWER = {"id": "chatcmpl-2", "object": "chat.completion", "created": 1, "model": "m-1",
               "choices": [{"index": 0, "finish_reason": "tool_calls", "logprobs": None, "message": {
                   "role": "assistant", "content": None, "tool_calls": [
                       {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}},
                       {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": "{}"}}]}}],
               "usage": USAGE}


def chunks_of(body: bytes) -> list[dict]:
    blocks = [b for b in body.decode().split("\n\n") if b]
    assert blocks[-1] == "data: [DONE]"
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def stream(*events: dict | str, split: str = "\n\n") -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}{split}" for e in events).encode()


@pytest.mark.parametrize("include_usage", [True, False])
def test_json_answer_as_openai_chunks(include_usage):
    converted = json_to_events(json.dumps(ANSWER).encode(), AnswerPlan(True, include_usage))
    assert converted is not None and converted.content_type == "text/event-stream" and converted.status is None
    chunks = chunks_of(converted.body)
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == "chatcmpl-1" and c["model"] == "m-1"
               and c["created"] == 1700000000 and c["system_fingerprint"] == "fp-1" for c in chunks)
    content = [c for c in chunks if c["choices"] and c["choices"][0]["delta"]]
    assert content[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hi there, friend."}
    finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finish == [None, "stop"]
    usage = [c for c in chunks if c.get("usage")]
    if include_usage:  # last, with no choices; every other chunk says "usage": null, as OpenAI's do
        assert usage == [chunks[-1]] and chunks[-1]["usage"] == USAGE and chunks[-1]["choices"] == []
        assert all("usage" in c and c["usage"] is None for c in chunks[:-1])
    else:
        assert usage == [] and all("usage" not in c for c in chunks)


def test_tool_calls_become_indexed_deltas_and_come_back_whole():
    plan = AnswerPlan(True, True)
    converted = json_to_events(json.dumps(TOOL_ANSWER).encode(), plan)
    assert converted is not None
    (first, *_) = chunks_of(converted.body)
    calls = first["choices"][0]["delta"]["tool_calls"]
    assert [(c["index"], c["id"], c["function"]["name"]) for c in calls] == [(0, "call_a", "f"), (1, "call_b", "g")]
    assert "content" not in first["choices"][0]["delta"]  # null fields are left out of a delta
    back = events_to_json(converted.body, AnswerPlan(False, False))
    assert back is not None
    message = json.loads(back.body)["choices"][0]["message"]
    assert message["tool_calls"] == TOOL_ANSWER["choices"][0]["message"]["tool_calls"]


def test_streamed_tool_call_arguments_are_joined():
    events = [{"id": "c", "created": 1, "model": "m", "choices": [{"index": 0, "delta": {"role": "assistant",
               "tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                               "function": {"name": "lookup", "arguments": ""}}]}}]},
              *({"id": "c", "choices": [{"index": 0, "delta": {"tool_calls": [
                  {"index": 0, "function": {"arguments": part}}]}}]} for part in ('{"ci', 'ty": "Pa', 'ris"}')),
              {"id": "c", "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]
    answer = json.loads(events_to_json(stream(*events, "[DONE]"), AnswerPlan(False, False)).body)
    call = answer["choices"][0]["message"]["tool_calls"][0]
    assert call == {"id": "call_1", "type": "function",
                    "function": {"name": "lookup", "arguments": '{"city": "Paris"}'}}
    assert answer["choices"][0]["finish_reason"] == "tool_calls"


def test_events_as_one_json_answer():
    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 5, "model": "m-2"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hel"}}]},
              {**base, "choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": None}]},
              {**base, "choices": [{"index": 1, "delta": {"role": "assistant", "content": "Other"}}]},
              {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
              {**base, "choices": [{"index": 1, "delta": {}, "finish_reason": "length"}]},
              {**base, "choices": [], "usage": USAGE}, "[DONE]"]
    converted = events_to_json(stream(*events), AnswerPlan(False, False))
    assert converted is not None and converted.content_type == "application/json" and converted.status is None
    answer = json.loads(converted.body)
    assert answer == {"id": "chatcmpl-9", "object": "chat.completion", "created": 5, "model": "m-2", "usage": USAGE,
                      "choices": [
                          {"index": 0, "message": {"role": "assistant", "content": "Hello"}, "logprobs": None,
                           "finish_reason": "stop"},
                          {"index": 1, "message": {"role": "assistant", "content": "Other"}, "logprobs": None,
                           "finish_reason": "length"}]}


@pytest.mark.parametrize("split", ["\n\n", "\r\n\r\n"])
def test_a_json_answer_survives_the_round_trip(split):
    events = json_to_events(json.dumps(ANSWER).encode(), AnswerPlan(True, True)).body
    if split != "\n\n":
        events = events.replace(b"\n\n", split.encode())
    back = json.loads(events_to_json(events, AnswerPlan(False, False)).body)
    assert back == {**ANSWER}


def test_an_error_event_becomes_the_error_it_reports():
    error = {"message": "the model failed mid-stream", "type": "server_error", "code": None}
    events = stream({"id": "c", "choices": [{"index": 0, "delta": {"content": "Hi"}}]}, {"error": error})
    converted = events_to_json(events, AnswerPlan(False, False))
    assert converted is not None and converted.status == STREAM_FAILED_STATUS
    assert json.loads(converted.body) == {"error": error}


@pytest.mark.parametrize(("name", "body"), [
    pytest.param(JSON_TO_EVENTS, b"not json", id="json-unreadable"),
    pytest.param(JSON_TO_EVENTS, b'{"object": "list", "data": []}', id="json-not-a-chat-answer"),
    pytest.param(JSON_TO_EVENTS, b'["a"]', id="json-not-an-object"),
    pytest.param(JSON_TO_EVENTS, b'{"choices": ["x"]}', id="json-odd-choice"),
    pytest.param(EVENTS_TO_JSON, b"data: {broken\n\n", id="events-unreadable"),
    pytest.param(EVENTS_TO_JSON, b": a comment only\n\n", id="events-none"),
    pytest.param(EVENTS_TO_JSON, b"data: [DONE]\n\n", id="events-only-done"),
    pytest.param(EVENTS_TO_JSON, b'data: {"choices": ["x"]}\n\n', id="events-odd-choice"),
])
def test_an_answer_a_converter_cannot_read_is_left_as_it_is(name, body):
    assert CONVERTERS[name](body, AnswerPlan(True, False)) is None
