"""Recorded shapes of each provider API's answers, written from the APIs' public references (the
examples of Anthropic's Messages API and its streaming page, the Gemini API's generateContent and
streamGenerateContent, botocore's service model of Bedrock's Converse and ConverseStream), for the
translation tables."""

from __future__ import annotations

import json

# --- Anthropic's Messages API ----------------------------------------------------------------------

ANTHROPIC_MESSAGE = {
    "id": "msg_013Zva2CMHLNnXjNJJKqJ2EF", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "text", "text": "Hi! My name is Claude."}],
    "stop_reason": "end_turn", "stop_sequence": None,
    "usage": {"input_tokens": 2095, "output_tokens": 503, "cache_creation_input_tokens": 0,
              "cache_read_input_tokens": 0},
}
ANTHROPIC_TOOL_MESSAGE = {
    "id": "msg_01Aq9w938a90dw8q", "type": "message", "role": "assistant", "model": "claude-sonnet-4-5",
    "content": [{"type": "thinking", "thinking": "The user wants the weather.", "signature": "abc"},
                {"type": "text", "text": "I'll check the weather."},
                {"type": "tool_use", "id": "toolu_01A09q90qw90lq917835lq9", "name": "get_weather",
                 "input": {"location": "San Francisco, CA", "unit": "celsius"}}],
    "stop_reason": "tool_use", "stop_sequence": None,
    "usage": {"input_tokens": 100, "output_tokens": 40, "cache_creation_input_tokens": 20,
              "cache_read_input_tokens": 300},
}
ANTHROPIC_ERROR = {"type": "error", "error": {"type": "rate_limit_error",
                                              "message": "Number of request tokens has exceeded your rate limit"}}


def anthropic_event(name: str, data: dict) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


# The streaming page's example, with a tool use block after the text
ANTHROPIC_STREAM = b"".join([
    anthropic_event("message_start", {"type": "message_start", "message": {
        "id": "msg_1nZdL29xx5MUA1yADyHTEsnR8uuvGzszyY", "type": "message", "role": "assistant", "content": [],
        "model": "claude-sonnet-4-5", "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5,
                  "cache_creation_input_tokens": 0}}}),
    anthropic_event("content_block_start", {"type": "content_block_start", "index": 0,
                                            "content_block": {"type": "text", "text": ""}}),
    anthropic_event("ping", {"type": "ping"}),
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": "Hello"}}),
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                            "delta": {"type": "text_delta", "text": "!"}}),
    anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
    anthropic_event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
        "type": "tool_use", "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6", "name": "get_weather", "input": {}}}),
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "input_json_delta", "partial_json": "{\"location\":"}}),
    anthropic_event("content_block_delta", {"type": "content_block_delta", "index": 1,
                                            "delta": {"type": "input_json_delta", "partial_json": " \"Paris\"}"}}),
    anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 1}),
    anthropic_event("message_delta", {"type": "message_delta", "delta": {"stop_reason": "tool_use",
                                                                         "stop_sequence": None},
                                      "usage": {"output_tokens": 15}}),
    anthropic_event("message_stop", {"type": "message_stop"}),
])

# --- the Gemini API --------------------------------------------------------------------------------

GEMINI_ANSWER = {
    "candidates": [{"content": {"parts": [{"text": "Let me think.", "thought": True},
                                          {"text": "Hello there! How can I help?"}], "role": "model"},
                    "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 9, "totalTokenCount": 21,
                      "thoughtsTokenCount": 4, "cachedContentTokenCount": 2},
    "modelVersion": "gemini-2.5-flash", "responseId": "mAitaLmkHPPlz7IPvtfUqQ4",
}
GEMINI_CALL = {
    "candidates": [{"content": {"parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}],
                                "role": "model"}, "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 30, "candidatesTokenCount": 5, "totalTokenCount": 35},
    "modelVersion": "gemini-2.5-flash", "responseId": "r2",
}
GEMINI_BLOCKED = {"promptFeedback": {"blockReason": "SAFETY"},
                  "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8}, "modelVersion": "gemini-2.5-flash"}
GEMINI_ERROR = {"error": {"code": 400, "message": "API key not valid. Please pass a valid API key.",
                          "status": "INVALID_ARGUMENT"}}


def gemini_event(data: dict) -> bytes:
    return f"data: {json.dumps(data)}\r\n\r\n".encode()


GEMINI_STREAM = b"".join([
    gemini_event({"candidates": [{"content": {"parts": [{"text": "The"}], "role": "model"}, "index": 0}],
                  "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
                  "modelVersion": "gemini-2.5-flash", "responseId": "s1"}),
    gemini_event({"candidates": [{"content": {"parts": [{"text": " sky is blue."}], "role": "model"}, "index": 0}],
                  "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
                  "modelVersion": "gemini-2.5-flash", "responseId": "s1"}),
    gemini_event({"candidates": [{"content": {"parts": [{"text": ""}], "role": "model"}, "finishReason": "STOP",
                                  "index": 0}],
                  "usageMetadata": {"promptTokenCount": 8, "candidatesTokenCount": 5, "totalTokenCount": 13},
                  "modelVersion": "gemini-2.5-flash", "responseId": "s1"}),
])

# --- Bedrock's Converse API ------------------------------------------------------------------------

CONVERSE_ANSWER = {
    "output": {"message": {"role": "assistant", "content": [
        {"reasoningContent": {"reasoningText": {"text": "Thinking.", "signature": "sig"}}},
        {"text": "Here is the weather."},
        {"toolUse": {"toolUseId": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "name": "top_song",
                     "input": {"sign": "WZPZ"}}}]}},
    "stopReason": "tool_use",
    "usage": {"inputTokens": 30, "outputTokens": 20, "totalTokens": 60, "cacheReadInputTokens": 10},
    "metrics": {"latencyMs": 1200},
}
CONVERSE_ERROR = {"message": "Malformed input request, please reformat your input and try again."}
