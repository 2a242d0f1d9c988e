"""OpenAI's chat API -> Google's Gemini API and its answers back (shapes as the Gemini API
reference gives them: `models/{model}:generateContent`, `:streamGenerateContent?alt=sse`,
`contents` of `parts`, `candidates`, `usageMetadata`, errors as `{"error": {"code", "message",
"status"}}`).

The request: system and developer messages as `systemInstruction`, the conversation as
`contents` (role `user` or `model`), images as `inlineData` (a data URL) or `fileData` (a URL),
tool calls as `functionCall` parts and tool results as `functionResponse` parts, the sampling
settings in `generationConfig`, tools as `functionDeclarations` with their JSON schema, `n` as
`candidateCount`. The answer: each candidate a choice; text (thoughts as reasoning), function
calls as tool calls, finish reasons mapped; a stream's events each into OpenAI chunks.

Usage: `promptTokenCount` (cached tokens included, as OpenAI counts them) plus tool-use prompt
tokens; `candidatesTokenCount` plus `thoughtsTokenCount` (OpenAI counts reasoning as completion).
"""

from __future__ import annotations

import mimetypes
from typing import Any

import orjson

from .openai_chunks import Chunk, ChunkMaker, StreamDecoder, openai_error_type, usage
from .parts import (
    Json,
    arguments,
    content_parts,
    functions,
    image_url,
    invalid,
    max_tokens,
    messages_of,
    stop_sequences,
    text_of,
    unsupported,
)
from .sse import EventSplitter

API = "the Gemini API"
FINISH = {"STOP": "stop", "MAX_TOKENS": "length", "SAFETY": "content_filter", "RECITATION": "content_filter",
          "BLOCKLIST": "content_filter", "PROHIBITED_CONTENT": "content_filter", "SPII": "content_filter",
          "IMAGE_SAFETY": "content_filter"}
# OpenAI's sampling settings and their generationConfig names
_SETTINGS = (("temperature", "temperature"), ("top_p", "topP"), ("seed", "seed"),
             ("presence_penalty", "presencePenalty"), ("frequency_penalty", "frequencyPenalty"))


def usage_to_openai(counted: object) -> dict[str, Any] | None:
    if not isinstance(counted, dict):
        return None
    prompt = _int(counted.get("promptTokenCount")) + _int(counted.get("toolUsePromptTokenCount"))
    completion = _int(counted.get("candidatesTokenCount")) + _int(counted.get("thoughtsTokenCount"))
    total = counted.get("totalTokenCount")
    cached = counted.get("cachedContentTokenCount")
    return usage(prompt, completion, _int(cached) if cached is not None else None,
                 _int(total) if total is not None else None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- requests -----------------------------------------------------------------------------------

def to_gemini_request(data: Json) -> Json:
    """An OpenAI chat request as a generateContent request (the model and the stream go in the path)."""
    system: list[str] = []
    contents: list[Json] = []
    names: dict[str, str] = {}  # tool call id -> function name (a functionResponse names its function)

    def add(role: str, parts: list[Json]) -> None:
        if not parts:
            return
        if contents and contents[-1]["role"] == role:
            contents[-1]["parts"].extend(parts)
        else:
            contents.append({"role": role, "parts": parts})

    for i, message in enumerate(messages_of(data)):
        role, where = message["role"], f"messages[{i}]"
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(text_of(content, where))
        elif role == "user":
            add("user", [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content_parts(content, where))])
        elif role == "assistant":
            parts = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content_parts(content, where))
                     if not (part.get("type") == "text" and not part.get("text"))]
            for j, call in enumerate(message.get("tool_calls") or ()):
                if not isinstance(call, dict):
                    raise invalid(f"{where}.tool_calls[{j}] must be an object")
                args = arguments(call, f"{where}.tool_calls[{j}]")
                name = call["function"]["name"]
                function_call: Json = {"name": name, "args": args}
                if isinstance(call.get("id"), str):
                    names[call["id"]] = name
                    function_call["id"] = call["id"]
                parts.append({"functionCall": function_call})
            add("model", parts)
        elif role == "tool":
            call_id = message.get("tool_call_id")
            if not isinstance(call_id, str) or call_id not in names:
                raise invalid(f"{where}: tool_call_id names no tool call of an earlier assistant message")
            add("user", [{"functionResponse": {"id": call_id, "name": names[call_id],
                                               "response": {"content": text_of(content, where)}}}])
        else:
            raise unsupported(f"{where}: role {role!r}", API)
    if not contents:
        raise invalid("messages: at least one user or assistant message is needed")
    out: Json = {"contents": contents}
    if system:
        out["systemInstruction"] = {"parts": [{"text": "\n\n".join(system)}]}
    config: Json = {}
    for key, name in _SETTINGS:
        if data.get(key) is not None:
            config[name] = data[key]
    limit = max_tokens(data)
    if limit is not None:
        config["maxOutputTokens"] = limit
    stops = stop_sequences(data)
    if stops:
        config["stopSequences"] = stops
    n = data.get("n")
    if n is not None and n != 1:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise invalid("'n' must be a positive integer", "invalid_n")
        config["candidateCount"] = n
    response_format = data.get("response_format")
    if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
        config["responseMimeType"] = "application/json"
        schema = response_format.get("json_schema")
        if isinstance(schema, dict) and isinstance(schema.get("schema"), dict):
            config["responseJsonSchema"] = schema["schema"]
    if config:
        out["generationConfig"] = config
    tools = functions(data, API)
    if tools:
        out["tools"] = [{"functionDeclarations": [
            {"name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
             **({"parametersJsonSchema": f["parameters"]} if f.get("parameters") else {})} for f in tools]}]
        mode = _mode(data.get("tool_choice"))
        if mode is not None:
            out["toolConfig"] = {"functionCallingConfig": mode}
    return out


def _part(part: Json, where: str) -> Json:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}: a text part needs text")
        return {"text": part["text"]}
    if kind == "image_url":
        media, data = image_url(part, where)
        if media is not None:
            return {"inlineData": {"mimeType": media, "data": data}}
        return {"fileData": {"mimeType": mimetypes.guess_type(data.split("?", 1)[0])[0] or "image/jpeg",
                             "fileUri": data}}
    raise unsupported(f"{where}: a content part of type {kind!r}", API)


def _mode(choice: object) -> Json | None:
    if choice is None:
        return None
    if choice in ("auto", "none"):
        return {"mode": str(choice).upper()}
    if choice == "required":
        return {"mode": "ANY"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return {"mode": "ANY", "allowedFunctionNames": [choice["function"]["name"]]}
    raise invalid("'tool_choice' must be none, auto, required or a function", "invalid_tool_choice")


# --- answers ------------------------------------------------------------------------------------

def _finish(reason: object, called: bool) -> str:
    if reason == "STOP" and called:
        return "tool_calls"
    return FINISH.get(str(reason), "stop")


def _parts(candidate: Json, calls_before: int) -> tuple[str, str, list[Json]]:
    """A candidate's text, thoughts and function calls (as OpenAI's tool calls, numbered on)."""
    texts: list[str] = []
    thoughts: list[str] = []
    calls: list[Json] = []
    found = candidate.get("content")
    content: Json = found if isinstance(found, dict) else {}
    for part in content.get("parts") or ():
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("text"), str):
            (thoughts if part.get("thought") else texts).append(part["text"])
        elif isinstance(part.get("functionCall"), dict):
            call = part["functionCall"]
            position = calls_before + len(calls)
            calls.append({"index": position, "id": call.get("id") or f"call_{position}", "type": "function",
                          "function": {"name": call.get("name"),
                                       "arguments": orjson.dumps(call.get("args") or {}).decode()}})
    return "".join(texts), "".join(thoughts), calls


def answer_to_openai(answer: object) -> Json | None:
    """A generateContent answer as an OpenAI chat answer (None: not one)."""
    if not isinstance(answer, dict) or not ("candidates" in answer or "promptFeedback" in answer):
        return None
    choices = []
    for position, candidate in enumerate(answer.get("candidates") or ()):
        if not isinstance(candidate, dict):
            continue
        text, thoughts, calls = _parts(candidate, 0)
        message: Json = {"role": "assistant", "content": text if text or not calls else None}
        if thoughts:
            message["reasoning_content"] = thoughts
        if calls:
            message["tool_calls"] = [{k: v for k, v in call.items() if k != "index"} for call in calls]
        choices.append({"index": candidate.get("index", position), "message": message, "logprobs": None,
                        "finish_reason": _finish(candidate.get("finishReason"), bool(calls))})
    if not choices:  # the prompt was blocked
        choices.append({"index": 0, "message": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": "content_filter"})
    out: Json = {"id": answer.get("responseId", ""), "object": "chat.completion", "created": 0,
                 "model": answer.get("modelVersion", ""), "choices": choices}
    counted = usage_to_openai(answer.get("usageMetadata"))
    if counted is not None:
        out["usage"] = counted
    return out


def error_to_openai(status: int, body: object) -> Json:
    """A Gemini error answer as OpenAI's error (its status name kept as the code)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message, code = str(error.get("message") or "the provider failed"), str(error.get("status") or status)
    else:
        message, code = "the provider failed", str(status)
    return {"error": {"message": message, "type": openai_error_type(status), "code": code}}


class GeminiStreamDecoder(StreamDecoder):
    """streamGenerateContent's events (each a partial answer), each into OpenAI chunks as it
    arrives: its text, thoughts and function calls as deltas, its finish reason; the last
    event's usage as the usage chunk at the end of the stream."""

    def __init__(self) -> None:
        super().__init__()
        self._events = EventSplitter()
        self._make = ChunkMaker()
        self._started: set[int] = set()
        self._calls: dict[int, int] = {}  # candidate -> tool calls so far

    def feed(self, data: bytes) -> list[Chunk]:
        return self._read(self._events.feed(data))

    def finish(self) -> list[Chunk]:
        out = self._read(self._events.flush())
        if self.complete and self.usage is not None:
            out.append(self._make.usage(self.usage))
        return out

    def _read(self, events: list[Any]) -> list[Chunk]:
        out: list[Chunk] = []
        for event in events:
            try:
                answer = orjson.loads(event.data)
            except ValueError:
                continue
            if isinstance(answer, dict):
                out.extend(self._answer(answer))
        return out

    def _answer(self, answer: Json) -> list[Chunk]:
        make = self._make
        if isinstance(answer.get("error"), dict):
            error = answer["error"]
            self.error = str(error.get("status") or error.get("code") or "error")
            return [{"error": {"message": str(error.get("message") or "the provider's stream failed"),
                               "type": "server_error", "code": self.error}}]
        if not make.id:
            make.id = str(answer.get("responseId") or "")
        if answer.get("modelVersion") and not self.model:
            self.model = make.model = str(answer["modelVersion"])
        counted = usage_to_openai(answer.get("usageMetadata"))
        if counted is not None:
            self.usage = counted
        out: list[Chunk] = []
        candidates = answer.get("candidates") or ()
        if not candidates and isinstance(answer.get("promptFeedback"), dict) \
                and answer["promptFeedback"].get("blockReason"):
            self.complete = True
            return [make.delta({"role": "assistant", "content": ""}, "content_filter")]
        for position, candidate in enumerate(candidates):
            if not isinstance(candidate, dict):
                continue
            index = candidate.get("index", position)
            before = self._calls.get(index, 0)
            text, thoughts, calls = _parts(candidate, before)
            delta: Json = {}
            if index not in self._started:
                self._started.add(index)
                delta["role"] = "assistant"
            if text or "role" in delta:
                delta["content"] = text
            if thoughts:
                delta["reasoning_content"] = thoughts
            if calls:
                delta["tool_calls"] = calls
                self._calls[index] = before + len(calls)
            if delta:
                out.append(make.delta(delta, None, index))
            reason = candidate.get("finishReason")
            if reason:
                out.append(make.delta({}, _finish(reason, bool(self._calls.get(index))), index))
                if index == 0:
                    self.complete = True
        return out
