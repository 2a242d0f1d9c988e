"""OpenAI's chat API <-> Anthropic's Messages API, both ways, from recorded shapes: requests (system
prompts, multi-turn, images, tools and tool results, stop, temperature, max tokens), answers
(text, thinking, tool use, stop reasons, usage with cached tokens), streams event by event and
whatever their chunks, errors; the client side checked with the official `anthropic` SDK's own
stream accumulator."""

from __future__ import annotations

import pytest
from anthropic.types import Message

from extproc.errors import GatewayError
from extproc.policy.table import ApiSettings
from extproc.translation import anthropic
from extproc.translation.openai_chunks import INCOMPLETE_MESSAGE, answer_chunks
from support.anthropic_sdk import sdk_message
from support.api_shapes import ANTHROPIC_ERROR, ANTHROPIC_MESSAGE, ANTHROPIC_STREAM, ANTHROPIC_TOOL_MESSAGE

SETTINGS = ApiSettings(max_tokens=1024)
PNG = "iVBORw0KGgo="
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string"}}}}}


def to_anthropic(data: dict, stream: bool = False) -> dict:
    return anthropic.to_anthropic_request(data, "claude-sonnet-4-5", SETTINGS, stream)


# --- requests: OpenAI -> Anthropic -------------------------------------------------------------------

def test_system_prompts_go_to_the_top_level_and_the_defaults_are_anthropics():
    out = to_anthropic({"messages": [{"role": "system", "content": "Be brief."},
                                     {"role": "developer", "content": [{"type": "text", "text": "Be kind."}]},
                                     {"role": "user", "content": "Hi"}]})
    assert out == {"model": "claude-sonnet-4-5", "max_tokens": 1024, "system": "Be brief.\n\nBe kind.",
                   "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}


@pytest.mark.parametrize(("given", "expected"), [
    ({"max_tokens": 50}, {"max_tokens": 50}),
    ({"max_completion_tokens": 70, "max_tokens": 50}, {"max_tokens": 70}),
    ({"temperature": 0.2, "top_p": 0.9}, {"temperature": 0.2, "top_p": 0.9, "max_tokens": 1024}),
    ({"stop": "END"}, {"stop_sequences": ["END"], "max_tokens": 1024}),
    ({"stop": ["a", "b"]}, {"stop_sequences": ["a", "b"], "max_tokens": 1024}),
    ({"user": "u-1"}, {"metadata": {"user_id": "u-1"}, "max_tokens": 1024}),
    ({"frequency_penalty": 1, "logprobs": True, "seed": 3, "stream_options": {"include_usage": True}},
     {"max_tokens": 1024}),  # dropped: Anthropic's API has no place for them
])
def test_sampling_settings(given, expected):
    out = to_anthropic({"messages": [{"role": "user", "content": "Hi"}], **given})
    assert {k: v for k, v in out.items() if k not in ("model", "messages")} == expected


def test_a_multi_turn_conversation_with_tools_and_their_results():
    out = to_anthropic({
        "messages": [
            {"role": "user", "content": "Weather in Paris and Rome?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
                {"id": "call_2", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Rome"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
            {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
            {"role": "user", "content": "Thanks!"}],
        "tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": False}, stream=True)
    assert out["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris and Rome?"}]},
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "call_1", "name": "get_weather", "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {"city": "Rome"}}]},
        {"role": "user", "content": [  # the results first, then the user's words: one turn
            {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"},
            {"type": "tool_result", "tool_use_id": "call_2", "content": "Rain"},
            {"type": "text", "text": "Thanks!"}]}]
    assert out["tools"] == [{"name": "get_weather", "description": "The weather in a city",
                             "input_schema": WEATHER["function"]["parameters"]}]
    assert out["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert out["stream"] is True


@pytest.mark.parametrize(("choice", "expected"), [
    ("auto", {"type": "auto"}), ("none", {"type": "none"}), ("required", {"type": "any"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"type": "tool", "name": "get_weather"}),
])
def test_tool_choice(choice, expected):
    out = to_anthropic({"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER], "tool_choice": choice})
    assert out["tool_choice"] == expected


def test_images_as_content_parts():
    out = to_anthropic({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}", "detail": "high"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}}]}]})
    assert out["messages"][0]["content"][1:] == [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": PNG}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}}]


@pytest.mark.parametrize(("data", "words"), [
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n other than 1"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]}, "input_audio"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/tiff;base64,AAAA"}}]}]}, "image/tiff"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]}, "not valid JSON"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "system", "content": "only a system prompt"}]}, "at least one"),
    ({"messages": [{"role": "user", "content": "Hi"}], "tools": [{"type": "code_interpreter"}]}, "tools[0]"),
])
def test_what_anthropic_cannot_carry_is_a_clear_400(data, words):
    with pytest.raises(GatewayError) as refused:
        to_anthropic(data)
    assert refused.value.status == 400 and words in refused.value.message


# --- requests: an Anthropic client's, into OpenAI's ----------------------------------------------

def test_an_anthropic_request_as_an_openai_one():
    out = anthropic.to_openai_request({
        "model": "claude", "max_tokens": 300, "system": [{"type": "text", "text": "Be brief."}],
        "stop_sequences": ["END"], "temperature": 0.5, "metadata": {"user_id": "u-7"},
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                         {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                                                      "data": PNG}}]},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": "s"},
                                              {"type": "text", "text": "Checking."},
                                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                                               "input": {"city": "Paris"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                                         {"type": "text", "text": "And?"}]}],
        "tools": [{"name": "get_weather", "input_schema": {"type": "object"}}],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True}}, stream=True)
    assert out["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Look:"},
                                     {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}]},
        {"role": "assistant", "content": "Checking.", "tool_calls": [
            {"id": "toolu_1", "type": "function", "function": {"name": "get_weather",
                                                               "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
        {"role": "user", "content": [{"type": "text", "text": "And?"}]}]
    assert (out["max_tokens"], out["stop"], out["temperature"], out["user"]) == (300, ["END"], 0.5, "u-7")
    assert out["stream"] is True and out["stream_options"] == {"include_usage": True}
    assert out["tools"] == [{"type": "function", "function": {"name": "get_weather",
                                                              "parameters": {"type": "object"}}}]
    assert out["tool_choice"] == "required" and out["parallel_tool_calls"] is False


def test_an_anthropic_request_with_a_system_message_inside_is_refused():
    with pytest.raises(GatewayError, match="role must be user or assistant"):
        anthropic.to_openai_request({"max_tokens": 1, "messages": [{"role": "system", "content": "x"}]}, False)


def test_a_server_tool_cannot_go_to_another_api():
    with pytest.raises(GatewayError, match="web_search"):
        anthropic.to_openai_request({"max_tokens": 1, "messages": [{"role": "user", "content": "x"}],
                                     "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, False)


# --- answers -------------------------------------------------------------------------------------

def test_an_answer_as_openais():
    out = anthropic.answer_to_openai(ANTHROPIC_MESSAGE)
    assert out["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hi! My name is Claude."},
                               "logprobs": None, "finish_reason": "stop"}]
    assert out["usage"] == {"prompt_tokens": 2095, "completion_tokens": 503, "total_tokens": 2598,
                            "prompt_tokens_details": {"cached_tokens": 0}}
    assert (out["id"], out["model"]) == ("msg_013Zva2CMHLNnXjNJJKqJ2EF", "claude-sonnet-4-5")


def test_a_tool_use_answer_and_cached_tokens():
    out = anthropic.answer_to_openai(ANTHROPIC_TOOL_MESSAGE)
    message = out["choices"][0]["message"]
    assert message["content"] == "I'll check the weather."
    assert message["reasoning_content"] == "The user wants the weather."
    assert message["tool_calls"] == [{"id": "toolu_01A09q90qw90lq917835lq9", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"location":"San Francisco, CA","unit":"celsius"}'}}]
    assert out["choices"][0]["finish_reason"] == "tool_calls"
    # the prompt: 100 uncached + 300 read from the cache + 20 written to it
    assert out["usage"] == {"prompt_tokens": 420, "completion_tokens": 40, "total_tokens": 460,
                            "prompt_tokens_details": {"cached_tokens": 300}}


@pytest.mark.parametrize(("reason", "finish"), [("end_turn", "stop"), ("stop_sequence", "stop"),
                                                ("max_tokens", "length"), ("tool_use", "tool_calls"),
                                                ("refusal", "content_filter")])
def test_stop_reasons(reason, finish):
    assert anthropic.answer_to_openai({**ANTHROPIC_MESSAGE, "stop_reason": reason})["choices"][0][
        "finish_reason"] == finish


def test_an_openai_answer_for_an_anthropic_client_reads_as_the_sdks_message():
    openai_answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen-plus",
                     "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                         "role": "assistant", "content": "Let me look.", "tool_calls": [
                             {"id": "call_9", "type": "function",
                              "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
                     "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42,
                               "prompt_tokens_details": {"cached_tokens": 10}}}
    message = Message.model_validate(anthropic.answer_to_anthropic(openai_answer))
    assert message.stop_reason == "tool_use"
    assert [b.type for b in message.content] == ["text", "tool_use"]
    assert message.content[1].input == {"city": "Oslo"} and message.content[1].id == "call_9"
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == \
        (20, 10, 12)


def test_errors_both_ways():
    assert anthropic.error_to_openai(429, ANTHROPIC_ERROR) == {"error": {
        "message": "Number of request tokens has exceeded your rate limit", "type": "rate_limit_error",
        "code": "rate_limit_error"}}
    assert anthropic.error_to_anthropic(400, {"error": {"message": "bad", "type": "invalid_request_error"}}) == \
        {"type": "error", "error": {"type": "invalid_request_error", "message": "bad"}}
    assert anthropic.error_to_anthropic(503, None)["error"]["type"] == "api_error"


# --- streams -------------------------------------------------------------------------------------

def decode(stream: bytes, piece: int) -> tuple[list[dict], anthropic.AnthropicStreamDecoder]:
    decoder = anthropic.AnthropicStreamDecoder()
    chunks = []
    for i in range(0, len(stream), piece):
        chunks.extend(decoder.feed(stream[i:i + piece]))
    return chunks + decoder.finish(), decoder


@pytest.mark.parametrize("piece", [1, 13, 100, len(ANTHROPIC_STREAM)])
def test_a_stream_event_by_event_into_openai_chunks(piece):
    chunks, decoder = decode(ANTHROPIC_STREAM, piece)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d["content"] for d in deltas if d.get("content")] == ["Hello", "!"]
    calls = [call for d in deltas for call in d.get("tool_calls", ())]
    assert calls[0] == {"index": 0, "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == '{"location": "Paris"}'
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["tool_calls"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 30, "completion_tokens": 15, "total_tokens": 45, "prompt_tokens_details": {"cached_tokens": 5}}
    assert decoder.complete and decoder.usage == chunks[-1]["usage"] and decoder.model == "claude-sonnet-4-5"
    assert all(c["id"] == "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY" for c in chunks)


def test_each_event_as_soon_as_it_is_whole():
    decoder = anthropic.AnthropicStreamDecoder()
    first_event_end = ANTHROPIC_STREAM.index(b"\n\n") + 2
    assert decoder.feed(ANTHROPIC_STREAM[:first_event_end - 1]) == []
    assert len(decoder.feed(ANTHROPIC_STREAM[first_event_end - 1:first_event_end])) == 1


def test_an_error_event_and_a_stream_that_stops_early():
    error = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    fourth_event_end = [i for i in range(len(ANTHROPIC_STREAM)) if ANTHROPIC_STREAM.startswith(b"\n\n", i)][3] + 2
    chunks, decoder = decode(ANTHROPIC_STREAM[:fourth_event_end] + error, 1000)
    assert [c["choices"][0]["delta"].get("content") for c in chunks[:-1]] == ["", "Hello"]
    assert chunks[-1] == {"error": {"message": "Overloaded", "type": "server_error", "code": "overloaded_error"}}
    assert decoder.error == "overloaded_error" and not decoder.complete


def test_openai_chunks_as_an_anthropic_stream_the_sdk_reads():
    answer = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "qwen-plus",
              "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                  "role": "assistant", "content": "Let me look.", "tool_calls": [
                      {"id": "call_9", "type": "function",
                       "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}}],
              "usage": {"prompt_tokens": 30, "completion_tokens": 12, "total_tokens": 42}}
    chunks = answer_chunks(answer, True)
    encoder = anthropic.AnthropicStreamEncoder()
    events = b"".join(encoder.encode([chunk]) for chunk in chunks) + encoder.finish(True)
    message, names = sdk_message(events)
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    assert message.content[0].text == "Let me look."
    assert message.content[1].name == "get_weather" and message.content[1].input == {"city": "Oslo"}
    assert message.stop_reason == "tool_use"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (30, 12)


def test_every_anthropic_event_round_trips_through_openai_chunks():
    chunks, decoder = decode(ANTHROPIC_STREAM, 50)
    encoder = anthropic.AnthropicStreamEncoder()
    message, _ = sdk_message(encoder.encode(chunks) + encoder.finish(decoder.complete))
    assert message.content[0].text == "Hello!" and message.content[1].input == {"location": "Paris"}
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens, message.usage.output_tokens) == \
        (25, 5, 15)


def test_an_incomplete_stream_ends_with_an_error_event():
    encoder = anthropic.AnthropicStreamEncoder()
    events = encoder.encode(answer_chunks(ANTHROPIC_AS_OPENAI, False)[:1]) + encoder.finish(False)
    with pytest.raises(RuntimeError, match="ended before it was complete"):
        sdk_message(events)
    assert INCOMPLETE_MESSAGE.encode() in events


ANTHROPIC_AS_OPENAI = anthropic.answer_to_openai(ANTHROPIC_MESSAGE)
