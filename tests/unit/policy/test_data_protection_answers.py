"""Every place an answer carries a model's text, whole and streamed: table tests."""

from __future__ import annotations

import pytest

from extproc.policy.data_protection.answers import answer_slots, finished_choices, stream_slots


@pytest.mark.parametrize(("answer", "paths"), [
    pytest.param({"choices": [{"message": {"role": "assistant", "content": "hi", "refusal": None}}]},
                 ["choices[0].message.content"], id="content"),
    pytest.param({"choices": [{"message": {"content": None, "reasoning_content": "think", "refusal": "no",
                                           "tool_calls": [{"function": {"name": "f", "arguments": "{}"}}],
                                           "function_call": {"arguments": "{}"}}}]},
                 ["choices[0].message.reasoning_content", "choices[0].message.refusal",
                  "choices[0].message.tool_calls[0].function.arguments", "choices[0].message.function_call.arguments"],
                 id="every-text-of-a-message"),
    pytest.param({"choices": [{"message": {"content": [{"type": "text", "text": "a"}, {"type": "image"}]}}]},
                 ["choices[0].message.content[0].text"], id="content-parts"),
    pytest.param({"choices": [{"text": "a"}, {"text": "b"}]}, ["choices[0].text", "choices[1].text"],
                 id="completions"),
    pytest.param({"object": "list", "data": [{"embedding": [0.1]}]}, [], id="embeddings-carry-none"),
    pytest.param({"choices": ["odd", {"message": "odd"}]}, [], id="not-objects"),
])
def test_answer_slots(answer, paths):
    assert [slot.path for slot in answer_slots(answer)] == paths


def test_stream_slots_key_each_text_by_what_it_continues():
    event = {"choices": [
        {"index": 1, "delta": {"content": "a", "reasoning_content": "b",
                               "tool_calls": [{"index": 2, "function": {"arguments": "{"}}]}, "finish_reason": None},
        {"index": 0, "text": "c", "finish_reason": "stop"}]}
    assert [key for key, _ in stream_slots(event)] == [(1, "content"), (1, "reasoning_content"),
                                                       (1, "tool_calls", 2), (0, "text")]
    assert finished_choices(event) == [0]
    assert stream_slots({"choices": [], "usage": {}}) == [] and finished_choices({"error": {}}) == []
