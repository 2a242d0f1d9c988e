"""OpenAI's chat API -> the Gemini API and back, from recorded shapes: the request (system
instruction, roles, images inline and by URL, function calls and responses, generationConfig,
tools with their JSON schema, tool choice), answers (text, thoughts, function calls, finish
reasons, usage with thoughts and cached tokens, a blocked prompt), streams (CRLF events, several
candidates), errors."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.translation import gemini
from support.api_shapes import GEMINI_ANSWER, GEMINI_BLOCKED, GEMINI_CALL, GEMINI_ERROR, GEMINI_STREAM

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather",
                                            "parameters": {"type": "object", "additionalProperties": False,
                                                           "properties": {"city": {"type": "string"}}}}}


def test_a_conversation_as_contents():
    out = gemini.to_gemini_request({
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": [
                         {"type": "text", "text": "Weather?"},
                         {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/"}},
                         {"type": "image_url", "image_url": {"url": "https://x.test/a.png?s=1"}}]},
                     {"role": "assistant", "content": None, "tool_calls": [
                         {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                                           "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
                     {"role": "user", "content": "Thanks"}],
        "tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "temperature": 0.1, "top_p": 0.5, "max_completion_tokens": 99, "stop": ["END"], "n": 2, "seed": 7,
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}})
    assert out["systemInstruction"] == {"parts": [{"text": "Be brief."}]}
    assert out["contents"] == [
        {"role": "user", "parts": [{"text": "Weather?"}, {"inlineData": {"mimeType": "image/jpeg", "data": "/9j/"}},
                                   {"fileData": {"mimeType": "image/png", "fileUri": "https://x.test/a.png?s=1"}}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"},
                                                      "id": "call_1"}}]},
        {"role": "user", "parts": [{"functionResponse": {"id": "call_1", "name": "get_weather",
                                                         "response": {"content": "Sunny"}}},
                                   {"text": "Thanks"}]}]
    assert out["generationConfig"] == {"temperature": 0.1, "topP": 0.5, "seed": 7, "maxOutputTokens": 99,
                                       "stopSequences": ["END"], "candidateCount": 2,
                                       "responseMimeType": "application/json",
                                       "responseJsonSchema": {"type": "object"}}
    assert out["tools"] == [{"functionDeclarations": [{"name": "get_weather", "description": "The weather",
                                                       "parametersJsonSchema": WEATHER["function"]["parameters"]}]}]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["get_weather"]}}


@pytest.mark.parametrize(("choice", "mode"), [("auto", "AUTO"), ("none", "NONE"), ("required", "ANY")])
def test_tool_choice(choice, mode):
    out = gemini.to_gemini_request({"messages": [{"role": "user", "content": "Hi"}], "tools": [WEATHER],
                                    "tool_choice": choice})
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": mode}}


def test_a_tool_result_must_answer_a_call():
    with pytest.raises(GatewayError, match="tool_call_id names no tool call"):
        gemini.to_gemini_request({"messages": [{"role": "tool", "tool_call_id": "x", "content": "y"}]})


def test_an_answer_with_thoughts_and_cached_tokens():
    out = gemini.answer_to_openai(GEMINI_ANSWER)
    assert out["choices"] == [{"index": 0, "logprobs": None, "finish_reason": "stop", "message": {
        "role": "assistant", "content": "Hello there! How can I help?", "reasoning_content": "Let me think."}}]
    # thoughts are completion tokens, as OpenAI counts reasoning; the cached ones are in the prompt's
    assert out["usage"] == {"prompt_tokens": 8, "completion_tokens": 13, "total_tokens": 21,
                            "prompt_tokens_details": {"cached_tokens": 2}}
    assert (out["id"], out["model"]) == ("mAitaLmkHPPlz7IPvtfUqQ4", "gemini-2.5-flash")


def test_a_function_call_answer():
    out = gemini.answer_to_openai(GEMINI_CALL)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    assert choice["message"]["tool_calls"] == [{"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": '{"city":"Paris"}'}}]


@pytest.mark.parametrize(("reason", "finish"), [("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
                                                ("RECITATION", "content_filter"), ("OTHER", "stop")])
def test_finish_reasons(reason, finish):
    answer = {**GEMINI_ANSWER, "candidates": [{**GEMINI_ANSWER["candidates"][0], "finishReason": reason}]}
    assert gemini.answer_to_openai(answer)["choices"][0]["finish_reason"] == finish


def test_a_blocked_prompt():
    out = gemini.answer_to_openai(GEMINI_BLOCKED)
    assert out["choices"][0]["finish_reason"] == "content_filter"
    assert out["usage"]["prompt_tokens"] == 8


def test_an_error():
    assert gemini.error_to_openai(400, GEMINI_ERROR) == {"error": {
        "message": "API key not valid. Please pass a valid API key.", "type": "invalid_request_error",
        "code": "INVALID_ARGUMENT"}}


@pytest.mark.parametrize("piece", [1, 9, len(GEMINI_STREAM)])
def test_a_stream_into_chunks(piece):
    decoder = gemini.GeminiStreamDecoder()
    chunks = []
    for i in range(0, len(GEMINI_STREAM), piece):
        chunks.extend(decoder.feed(GEMINI_STREAM[i:i + piece]))
    chunks += decoder.finish()
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "The"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == "The sky is blue."
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]] \
        == ["stop"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 8, "completion_tokens": 5, "total_tokens": 13}
    assert decoder.complete and decoder.model == "gemini-2.5-flash"


def test_a_stream_of_two_candidates_and_a_function_call():
    decoder = gemini.GeminiStreamDecoder()
    event = {"candidates": [{"content": {"parts": [{"text": "A"}]}, "index": 0},
                            {"content": {"parts": [{"functionCall": {"name": "f", "args": {}}}]},
                             "finishReason": "STOP", "index": 1}]}
    import json

    chunks = decoder.feed(f"data: {json.dumps(event)}\n\n".encode())
    by_index = {c["choices"][0]["index"]: c["choices"][0] for c in chunks}
    assert by_index[0]["delta"]["content"] == "A"
    finishes = [c["choices"][0] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == [{"index": 1, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}]
    assert not decoder.complete  # the first candidate has not finished


def test_an_error_in_a_stream():
    decoder = gemini.GeminiStreamDecoder()
    (chunk,) = decoder.feed(b'data: {"error": {"code": 500, "message": "Internal", "status": "INTERNAL"}}\r\n\r\n')
    assert chunk == {"error": {"message": "Internal", "type": "server_error", "code": "INTERNAL"}}
    assert decoder.error == "INTERNAL" and decoder.finish() == []
