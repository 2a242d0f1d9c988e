"""Prompt and answer contents for spans (off unless turned on): the input messages and the
answer's text taken out of a JSON answer or a stream's deltas, masked with every built-in and the
route's policies' detectors, bounded, never failing a request."""

from __future__ import annotations

import json

import pytest

from extproc.dataplane.trace_contents import TraceContents, answer_text, capture_contents, input_messages
from extproc.policy.data_protection.trace_masking import MAX_TEXT, TRUNCATED, mask_for_trace, masked_with
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS
from support.manifests import DASHSCOPE, load_docs, provider

SECRET = "sk-" + "Z9y8X7w6V5u4T3s2R1q0PpOo"


@pytest.mark.parametrize("environ, on", [({}, False), ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"},
                                                        True), ({"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT":
                                                                 "false"}, False)])
def test_contents_are_captured_only_when_turned_on(environ, on):
    assert capture_contents(environ) is on


def test_every_builtin_masks_even_where_no_policy_applies():
    text = f"key {SECRET}, mail ann@example.org, card 4111-1111-1111-1111, from 10.1.2.3"
    masked = mask_for_trace(text, None)
    assert masked == "key [SECRET], mail [EMAIL], card [BANK-CARD], from [IPV4]"
    assert masked_with(None) == "builtins"


def test_a_text_is_cut_after_masking_and_says_so():
    masked = mask_for_trace("x" * (MAX_TEXT + 10) + f" {SECRET}", None)
    assert masked.endswith(TRUNCATED) and len(masked) == MAX_TEXT + len(TRUNCATED) and SECRET[:8] not in masked


def test_the_routes_policies_detectors_mask_too_whatever_their_action(tmp_path):
    policy = {"apiVersion": "llm-gateway.dev/v1alpha1", "kind": "LLMDataPolicy", "metadata": {"name": "p"},
              "spec": {"rules": [{"name": "tickets", "action": "log",
                                  "detectors": [{"regex": "ACME-[0-9]{6}", "name": "ticket"}]}]}}
    table = load_docs(tmp_path, provider("dashscope", DASHSCOPE), policy).table
    route = table.route_for(DASHSCOPE).name
    contents = TraceContents(lambda: table)
    entry = contents.prompt_entry(json.dumps({"messages": [{"role": "user", "content": f"ACME-123456 {SECRET}"}]})
                                  .encode(), CHAT, route)
    assert b"[TICKET] [SECRET]" in entry and b"ACME-123456" not in entry
    assert contents.prompt_entry(b"not json", CHAT, route) == b""  # never fails the request


@pytest.mark.parametrize("endpoint, body, expected", [
    (CHAT, {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": f"use {SECRET}"}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"function": {"name": "f", "arguments": '{"to": "bo@example.com"}'}}]}]},
     [{"role": "system", "parts": [{"type": "text", "content": "Be brief."}]},
      {"role": "user", "parts": [{"type": "text", "content": "use [SECRET]"}]},
      {"role": "assistant", "parts": [{"type": "tool_call", "arguments": '{"to": "[EMAIL]"}'}]}]),
    (COMPLETIONS, {"prompt": ["one", "two"]},
     [{"role": "user", "parts": [{"type": "text", "content": "one"}]},
      {"role": "user", "parts": [{"type": "text", "content": "two"}]}]),
    (EMBEDDINGS, {"input": [1, 2, 3]}, []),  # token arrays carry no text
])
def test_input_messages_of_every_endpoint(endpoint, body, expected):
    assert input_messages(body, endpoint, None) == expected


@pytest.mark.parametrize("sample, stream, text", [
    (json.dumps({"choices": [{"message": {"role": "assistant", "content": "Hello"}, "finish_reason": "stop"}]}),
     False, "Hello"),
    (json.dumps({"choices": [{"message": {"content": None, "tool_calls": [{"function": {"arguments": "{}"}}]}}]}),
     False, "{}"),  # no content: the calls' arguments
    ('{"choices": [{"message": {"content": "Hel', False, "[the answer is longer than what the gateway keeps for "
                                                       "traces]"),
    ('data: {"choices":[{"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"delta":{"content":"lo"},'
     '"finish_reason":"stop"}]}\n\ndata: {"choices":[],"usage":{}}\n\ndata: [DONE]\n\n', True, "Hello"),
    ('data: {"choices":[{"delta":{"content":"Hel"}}]}\n\ndata: {"choices":[{"delta":{"cont', True, "Hel"),  # cut
])
def test_the_answers_text_from_a_json_answer_or_a_streams_deltas(sample, stream, text):
    assert answer_text(sample, stream) == text
