"""The server-sent-event reader: OpenAI chat streams read as they pass, however the network splits them."""

from __future__ import annotations

import json

import pytest

from extproc.sse import SSEReader, StreamSummary

MODEL = "gpt-4o-2024-08-06"


def chunk(choices: list, usage: dict | None = None, **extra) -> dict:
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1718000000, "model": MODEL,
            "system_fingerprint": "fp_1", "choices": choices, "usage": usage, **extra}


def delta(**fields) -> list:
    return [{"index": 0, "delta": fields, "logprobs": None, "finish_reason": None}]


def sse(*events: dict | str, newline: bytes = b"\n") -> bytes:
    out = b""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out += b"data: " + data.encode() + newline + newline
    return out


USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}
OPENAI_EVENTS = (
    chunk(delta(role="assistant", content="", refusal=None)),  # the role chunk: no text yet
    chunk(delta(content="Hello")),
    chunk(delta(content=" world")),
    chunk(delta(content="!")),
    chunk([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]),
    chunk([], usage=USAGE),
    "[DONE]",
)
OPENAI_STREAM = sse(*OPENAI_EVENTS)
EXPECTED = StreamSummary(events=7, content_events=3, model=MODEL, prompt_tokens=12, completion_tokens=3,
                         total_tokens=15, error=None, done=True)


def read(*chunks: bytes) -> tuple[StreamSummary, list[int]]:
    reader = SSEReader()
    counts = [reader.feed(c) for c in chunks]
    return reader.finish(), counts


def test_openai_stream_in_one_chunk():
    summary, counts = read(OPENAI_STREAM)
    assert summary == EXPECTED
    assert counts == [3]


def test_openai_stream_split_at_every_offset():
    for i in range(len(OPENAI_STREAM) + 1):
        summary, counts = read(OPENAI_STREAM[:i], OPENAI_STREAM[i:])
        assert summary == EXPECTED, f"split at byte {i}"
        assert sum(counts) == 3, f"split at byte {i}: {counts}"


def test_openai_stream_one_byte_at_a_time():
    reader = SSEReader()
    counts = [reader.feed(OPENAI_STREAM[i:i + 1]) for i in range(len(OPENAI_STREAM))]
    # the first content event is complete at the blank line after "Hello", not before
    first_done = OPENAI_STREAM.index(b"\n\n", OPENAI_STREAM.index(b'"Hello"')) + 1
    assert counts.index(1) == first_done
    assert sum(counts) == 3 and set(counts) == {0, 1}
    assert reader.finish() == EXPECTED


def test_crlf_line_endings_split_at_every_offset():
    stream = sse(*OPENAI_EVENTS, newline=b"\r\n")
    assert b"\r\n\r\n" in stream
    assert read(stream)[0] == EXPECTED
    for i in range(len(stream) + 1):  # includes splits between \r and \n
        summary, counts = read(stream[:i], stream[i:])
        assert summary == EXPECTED, f"split at byte {i}"
        assert sum(counts) == 3, f"split at byte {i}: {counts}"


def test_feed_counts_the_event_it_completes_not_the_one_it_starts():
    first, second = sse(chunk(delta(content="Hi"))), sse(chunk(delta(content=" there")))
    reader = SSEReader()
    cut = len(first) // 2
    assert reader.feed(first[:cut]) == 0
    assert reader.feed(first[cut:] + second[:cut]) == 1
    assert reader.feed(second[cut:]) == 1
    assert reader.finish().content_events == 2


def test_blank_line_split_from_its_event():
    event = sse(chunk(delta(content="Hi")))
    reader = SSEReader()
    assert reader.feed(event[:-1]) == 0  # "data: ...\n" without the blank line: not complete yet
    assert reader.summary.content_events == 0
    assert reader.feed(event[-1:]) == 1


@pytest.mark.parametrize(("stream", "expected"), [
    pytest.param(b'data: {"model": "m1",\ndata: "choices": [{"delta": {"content": "x"}}]}\n\n',
                 StreamSummary(events=1, content_events=1, model="m1"), id="several-data-lines-joined"),
    pytest.param(b'data:{"model":"m2","choices":[{"delta":{"content":"x"}}]}\n\n',
                 StreamSummary(events=1, content_events=1, model="m2"), id="data-without-space"),
    pytest.param(b': keepalive\n\n: another comment\n\n',
                 StreamSummary(), id="comments-only"),
    pytest.param(b'event: message\nid: 7\nretry: 1000\n: note\ndata: {"choices":[{"delta":{"content":"x"}}]}\n\n',
                 StreamSummary(events=1, content_events=1), id="event-id-retry-comment-lines-ignored"),
    pytest.param(b'event: ping\nid: 8\n\n',
                 StreamSummary(), id="event-without-data"),
    pytest.param(b'data: hello there\n\ndata: {"truncated": \n\n',
                 StreamSummary(events=2), id="non-json-data-ignored"),
    pytest.param(b'data: [1, 2]\n\ndata: "text"\n\ndata: null\n\n',
                 StreamSummary(events=3), id="json-not-an-object-ignored"),
    pytest.param(b'data: {"choices":[{"delta":{"content":""}}]}\n\ndata: {"choices":[{"delta":{"role":"assistant"}}]}\n\n',
                 StreamSummary(events=2), id="empty-content-and-role-not-content"),
    pytest.param(b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"id":"call_1","type":"function",'
                 b'"function":{"name":"get_weather","arguments":""}}]}}]}\n\n'
                 b'data: {"choices":[{"delta":{"tool_calls":[{"index":0,"function":{"arguments":"{\\"city\\""}}]}}]}\n\n',
                 StreamSummary(events=2, content_events=2), id="tool-call-deltas-are-content"),
    pytest.param(b'data: {"choices":[{"index":0,"delta":{"content":"a"}},{"index":1,"delta":{"content":"b"}}]}\n\n',
                 StreamSummary(events=1, content_events=1), id="several-choices-one-event"),
    pytest.param(b'data: {"choices":"nope","usage":[1]}\n\ndata: {"choices":[1, null, {"delta":"x"}]}\n\n',
                 StreamSummary(events=2), id="odd-shapes-ignored"),
    pytest.param(b'data: {"error": {"message": "The server had an error", "type": "server_error", "code": null}}\n\n',
                 StreamSummary(events=1, error="server_error"), id="error-type"),
    pytest.param(b'data: {"error": {"message": "slow down", "type": "", "code": "rate_limit_exceeded"}}\n\n',
                 StreamSummary(events=1, error="rate_limit_exceeded"), id="error-code-when-no-type"),
    pytest.param(b'data: {"error": "something broke"}\n\n',
                 StreamSummary(events=1, error="stream_error"), id="error-string"),
    pytest.param(b'data: {"error": {"type": "' + b"x" * 200 + b'"}}\n\n',
                 StreamSummary(events=1, error="x" * 64), id="error-type-bounded"),
    pytest.param(b'data: {"choices":[],"usage":{"prompt_tokens":true,"completion_tokens":2.5,"total_tokens":"9"}}\n\n',
                 StreamSummary(events=1), id="usage-non-integers-ignored"),
    pytest.param(b'data: {"choices":[],"usage":{"prompt_tokens":0,"completion_tokens":0,"total_tokens":0}}\n\n',
                 StreamSummary(events=1, prompt_tokens=0, completion_tokens=0, total_tokens=0), id="usage-zero"),
    pytest.param(b'data: {"model":"m","choices":[],"usage":null}\n\n',
                 StreamSummary(events=1, model="m"), id="usage-null"),
    pytest.param(b'data: [DONE]\n\n',
                 StreamSummary(events=1, done=True), id="done"),
])
def test_event_shapes(stream: bytes, expected: StreamSummary):
    assert read(stream)[0] == expected


@pytest.mark.parametrize(("tail", "field", "value"), [
    pytest.param(b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}',
                 "completion_tokens", 7, id="usage"),
    pytest.param(b'data: [DONE]\n', "done", True, id="done-single-newline"),
    pytest.param(b'data: {"choices":[{"delta":{"content":"x"}}]}', "content_events", 1, id="content"),
    pytest.param(b'data: {"error":{"type":"server_error"}}\r\n', "error", "server_error", id="error-crlf"),
])
def test_last_event_without_blank_line_counts_after_finish(tail: bytes, field: str, value):
    reader = SSEReader()
    assert reader.feed(tail) == 0
    assert getattr(reader.summary, field) == getattr(StreamSummary(), field)  # not yet
    assert getattr(reader.finish(), field) == value
    assert reader.summary.events == 1
    assert getattr(reader.finish(), field) == value and reader.summary.events == 1  # finishing twice counts once


def test_finish_with_only_whitespace_left_counts_nothing():
    reader = SSEReader()
    reader.feed(sse(chunk(delta(content="x"))) + b"\n")
    assert reader.finish() == StreamSummary(events=1, content_events=1, model=MODEL)


def test_later_usage_and_model_win():
    stream = sse({"model": "a", "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}},
                 {"model": "b", "choices": [], "usage": {"completion_tokens": 9}})
    summary = read(stream)[0]
    assert (summary.model, summary.prompt_tokens, summary.completion_tokens, summary.total_tokens) == ("b", 1, 9, 2)
