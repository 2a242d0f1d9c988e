"""OpenAI's chat API <-> Anthropic's Messages API, both ways (shapes as Anthropic's API reference
gives them: `POST /v1/messages`, its content blocks, its stream's events, its errors):

- a provider that speaks Anthropic's API: an OpenAI chat request translated into a Messages
  request (`to_anthropic_request`), its answer back (`answer_to_openai`, the stream by
  `AnthropicStreamDecoder`), its errors back (`error_to_openai`);
- a client that speaks Anthropic's API (`POST .../messages`): its request translated into an
  OpenAI chat request (`to_openai_request`), which goes on to any provider, and the OpenAI answer
  translated back (`answer_to_anthropic`, the stream by `AnthropicStreamEncoder`), errors too
  (`error_to_anthropic`).

Usage: Anthropic's `input_tokens` leaves out the prompt's cached tokens (`cache_read_input_tokens`,
`cache_creation_input_tokens`); OpenAI's `prompt_tokens` includes them. docs/translation.md lists
what is kept, mapped and dropped.
"""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import anthropic_error_type
from ..policy.table import ApiSettings
from .openai_chunks import INCOMPLETE_MESSAGE, Chunk, ChunkMaker, StreamDecoder, StreamEncoder, openai_error_type, usage
from .parts import (
    Json,
    arguments,
    content_parts,
    functions,
    image_url,
    invalid,
    max_tokens,
    messages_of,
    one_choice,
    stop_sequences,
    text_of,
    unsupported,
)
from .sse import EventSplitter

API = "Anthropic's Messages API"
IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")

# stop_reason -> finish_reason, and back
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls",
          "pause_turn": "stop", "refusal": "content_filter", "model_context_window_exceeded": "length"}
STOP = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use",
        "content_filter": "refusal"}


def usage_to_openai(counted: object) -> dict[str, Any] | None:
    """Anthropic's usage in OpenAI's shape: the prompt's cached tokens (read and written) are
    part of `prompt_tokens`, those read from the cache also counted apart."""
    if not isinstance(counted, dict):
        return None
    read = _int(counted.get("cache_read_input_tokens"))
    written = _int(counted.get("cache_creation_input_tokens"))
    prompt = _int(counted.get("input_tokens")) + read + written
    return usage(prompt, _int(counted.get("output_tokens")), read if "cache_read_input_tokens" in counted else None)


def usage_to_anthropic(counted: object) -> dict[str, Any]:
    """OpenAI's usage in Anthropic's shape: cached prompt tokens as `cache_read_input_tokens`."""
    if not isinstance(counted, dict):
        return {"input_tokens": 0, "output_tokens": 0}
    details = counted.get("prompt_tokens_details")
    cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return {"input_tokens": _int(counted.get("prompt_tokens")) - cached,
            "output_tokens": _int(counted.get("completion_tokens")),
            "cache_read_input_tokens": cached, "cache_creation_input_tokens": 0}


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- requests -----------------------------------------------------------------------------------

def to_anthropic_request(data: Json, model: str, settings: ApiSettings, stream: bool) -> Json:
    """An OpenAI chat request as a Messages request: system and developer messages as `system`,
    tool results as `tool_result` blocks in the user's turn, consecutive turns of one role joined."""
    one_choice(data, API)
    system: list[str] = []
    turns: list[Json] = []

    def add(role: str, blocks: list[Json]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            # tool results come first in a user turn (Anthropic's rule)
            merged = turns[-1]["content"] + blocks
            turns[-1]["content"] = [b for b in merged if b["type"] == "tool_result"] + \
                [b for b in merged if b["type"] != "tool_result"]
        else:
            turns.append({"role": role, "content": blocks})

    for i, message in enumerate(messages_of(data)):
        role, where = message["role"], f"messages[{i}]"
        content = message.get("content")
        if role in ("system", "developer"):
            system.append(text_of(content, where))
        elif role == "user":
            add("user", [_block(part, f"{where}.content[{j}]")
                         for j, part in enumerate(content_parts(content, where))])
        elif role == "assistant":
            blocks = [_block(part, f"{where}.content[{j}]") for j, part in enumerate(content_parts(content, where))
                      if not (part.get("type") == "text" and not part.get("text"))]
            for j, call in enumerate(message.get("tool_calls") or ()):
                if not isinstance(call, dict) or not isinstance(call.get("id"), str):
                    raise invalid(f"{where}.tool_calls[{j}] needs an id")
                blocks.append({"type": "tool_use", "id": call["id"], "name": call["function"]["name"] if
                               isinstance(call.get("function"), dict) else "",
                               "input": arguments(call, f"{where}.tool_calls[{j}]")})
            add("assistant", blocks)
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise invalid(f"{where}: a tool message needs tool_call_id")
            add("user", [{"type": "tool_result", "tool_use_id": message["tool_call_id"],
                          "content": text_of(content, where)}])
        else:
            raise unsupported(f"{where}: role {role!r}", API)
    if not turns:
        raise invalid("messages: at least one user or assistant message is needed")
    out: Json = {"model": model, "messages": turns,
                 "max_tokens": max_tokens(data) or settings.max_tokens}
    if system:
        out["system"] = "\n\n".join(system)
    for key in ("temperature", "top_p"):
        if data.get(key) is not None:
            out[key] = data[key]
    stops = stop_sequences(data)
    if stops:
        out["stop_sequences"] = stops
    if stream:
        out["stream"] = True
    tools = functions(data, API)
    if tools:
        out["tools"] = [{"name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
                         "input_schema": f.get("parameters") or {"type": "object", "properties": {}}}
                        for f in tools]
    choice = _tool_choice(data.get("tool_choice"))
    if data.get("parallel_tool_calls") is False and tools:
        choice = {**(choice or {"type": "auto"}), "disable_parallel_tool_use": True}
    if choice is not None and tools:
        out["tool_choice"] = choice
    if isinstance(data.get("user"), str):
        out["metadata"] = {"user_id": data["user"]}
    return out


def _block(part: Json, where: str) -> Json:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}: a text part needs text")
        return {"type": "text", "text": part["text"]}
    if kind == "image_url":
        media, data = image_url(part, where)
        if media is None:
            return {"type": "image", "source": {"type": "url", "url": data}}
        if media not in IMAGE_TYPES:
            raise unsupported(f"{where}: an image of type {media}", API)
        return {"type": "image", "source": {"type": "base64", "media_type": media, "data": data}}
    raise unsupported(f"{where}: a content part of type {kind!r}", API)


def _tool_choice(choice: object) -> Json | None:
    if choice is None:
        return None
    if choice == "auto":
        return {"type": "auto"}
    if choice == "none":
        return {"type": "none"}
    if choice == "required":
        return {"type": "any"}
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
            and isinstance(choice["function"].get("name"), str):
        return {"type": "tool", "name": choice["function"]["name"]}
    raise invalid("'tool_choice' must be none, auto, required or a function", "invalid_tool_choice")


def to_openai_request(data: Json, stream: bool) -> Json:
    """A Messages request (an Anthropic client's) as an OpenAI chat request, for a provider that
    speaks OpenAI's API, or as the common form on the way to another API."""
    messages: list[Json] = []
    system = data.get("system")
    if system is not None:
        messages.append({"role": "system", "content": system if isinstance(system, str)
                         else text_of(system, "system")})
    for i, message in enumerate(messages_of(data)):
        role, where = message["role"], f"messages[{i}]"
        if role not in ("user", "assistant"):
            raise invalid(f"{where}: role must be user or assistant (the system prompt is the top-level "
                          "`system`)")
        content = message.get("content")
        blocks = [{"type": "text", "text": content}] if isinstance(content, str) else content
        if not isinstance(blocks, list):
            raise invalid(f"{where}: content must be a string or an array of blocks")
        parts: list[Json] = []
        calls: list[Json] = []
        for j, block in enumerate(blocks):
            at = f"{where}.content[{j}]"
            kind = block.get("type") if isinstance(block, dict) else None
            if kind == "text" and isinstance(block.get("text"), str):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image" and role == "user":
                parts.append({"type": "image_url", "image_url": {"url": _image_url(block, at)}})
            elif kind == "tool_use" and role == "assistant":
                calls.append({"id": block.get("id"), "type": "function", "function": {
                    "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
            elif kind == "tool_result" and role == "user":
                result = block.get("content")
                messages.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                                 "content": result if isinstance(result, str) else text_of(result, at)})
            elif kind in ("thinking", "redacted_thinking") and role == "assistant":
                continue  # the model's own reasoning of an earlier turn: OpenAI's API has no place for it
            else:
                raise unsupported(f"{at}: a {role} content block of type {kind!r}", "OpenAI's chat API")
        if role == "assistant":
            text = "".join(p["text"] for p in parts)
            turn: Json = {"role": "assistant", "content": text or None}
            if calls:
                turn["tool_calls"] = calls
            if text or calls:
                messages.append(turn)
        elif parts:
            messages.append({"role": "user", "content": parts})
    out: Json = {"model": data.get("model", ""), "messages": messages, "max_tokens": data["max_tokens"]}
    for key in ("temperature", "top_p"):
        if data.get(key) is not None:
            out[key] = data[key]
    if isinstance(data.get("stop_sequences"), list) and data["stop_sequences"]:
        out["stop"] = data["stop_sequences"]
    if stream:
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    tools = data.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = []
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or tool.get("type") not in (None, "custom") \
                    or not isinstance(tool.get("name"), str):
                kind = tool.get("type") if isinstance(tool, dict) else None
                raise unsupported(f"tools[{i}]: a tool of type {kind!r}", "OpenAI's chat API")
            function: Json = {"name": tool["name"], "parameters": tool.get("input_schema") or {"type": "object"}}
            if tool.get("description"):
                function["description"] = tool["description"]
            out["tools"].append({"type": "function", "function": function})
        choice = data.get("tool_choice")
        if isinstance(choice, dict):
            kind = choice.get("type")
            if kind == "tool" and isinstance(choice.get("name"), str):
                out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
            elif kind in ("auto", "none"):
                out["tool_choice"] = kind
            elif kind == "any":
                out["tool_choice"] = "required"
            if choice.get("disable_parallel_tool_use") is True:
                out["parallel_tool_calls"] = False
    metadata = data.get("metadata")
    if isinstance(metadata, dict) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    return out


def _image_url(block: Json, where: str) -> str:
    source = block.get("source")
    if isinstance(source, dict):
        if source.get("type") == "base64" and isinstance(source.get("data"), str):
            return f"data:{source.get('media_type', 'image/png')};base64,{source['data']}"
        if source.get("type") == "url" and isinstance(source.get("url"), str):
            return str(source["url"])
    raise invalid(f"{where}: an image needs a base64 or url source")


# --- answers ------------------------------------------------------------------------------------

def answer_to_openai(message: object) -> Json | None:
    """A Messages answer as an OpenAI chat answer (None: not a Messages answer)."""
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        return None
    texts, reasoning, calls = [], [], []
    for block in message["content"]:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "thinking" and isinstance(block.get("thinking"), str):
            reasoning.append(block["thinking"])
        elif kind == "tool_use":
            calls.append({"id": block.get("id"), "type": "function", "function": {
                "name": block.get("name"), "arguments": orjson.dumps(block.get("input") or {}).decode()}})
    reply: Json = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if calls:
        reply["tool_calls"] = calls
    answer: Json = {"id": message.get("id", ""), "object": "chat.completion", "created": 0,
                    "model": message.get("model", ""),
                    "choices": [{"index": 0, "message": reply, "logprobs": None,
                                 "finish_reason": FINISH.get(str(message.get("stop_reason")), "stop")}]}
    counted = usage_to_openai(message.get("usage"))
    if counted is not None:
        answer["usage"] = counted
    return answer


def answer_to_anthropic(answer: object) -> Json | None:
    """An OpenAI chat answer as a Messages answer, for a client of Anthropic's API (its first
    choice: Anthropic's answers have one)."""
    if not isinstance(answer, dict) or not isinstance(answer.get("choices"), list) or not answer["choices"]:
        return None
    choice = answer["choices"][0]
    if not isinstance(choice, dict):
        return None
    found = choice.get("message")
    message: Json = found if isinstance(found, dict) else {}
    content: list[Json] = []
    if isinstance(message.get("content"), str) and message["content"]:
        content.append({"type": "text", "text": message["content"]})
    for call in message.get("tool_calls") or ():
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            content.append({"type": "tool_use", "id": call.get("id") or "", "name": call["function"].get("name"),
                            "input": _loads_object(call["function"].get("arguments"))})
    return {"id": answer.get("id", ""), "type": "message", "role": "assistant", "model": answer.get("model", ""),
            "content": content, "stop_reason": STOP.get(str(choice.get("finish_reason")), "end_turn"),
            "stop_sequence": None, "usage": usage_to_anthropic(answer.get("usage"))}


def _loads_object(text: object) -> Any:
    """A tool call's arguments as the object Anthropic's `input` is (text that is not a JSON
    object is kept under `arguments`, never lost)."""
    if isinstance(text, dict):
        return text
    try:
        value = orjson.loads(text) if isinstance(text, str) and text else {}
    except ValueError:
        return {"arguments": text}
    return value if isinstance(value, dict) else {"arguments": value}


def error_to_openai(status: int, body: object) -> Json:
    """An Anthropic error answer as OpenAI's error (its type kept as the code)."""
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        message, code = str(error.get("message") or "the provider failed"), str(error.get("type") or status)
    else:
        message, code = "the provider failed", str(status)
    return {"error": {"message": message, "type": openai_error_type(status), "code": code}}


def error_to_anthropic(status: int, body: object) -> Json:
    """An OpenAI error answer (a provider's or the gateway's) as Anthropic's error."""
    error = body.get("error") if isinstance(body, dict) else None
    message = str(error.get("message")) if isinstance(error, dict) and error.get("message") else "the provider failed"
    return {"type": "error", "error": {"type": anthropic_error_type(status), "message": message}}


# --- streams ------------------------------------------------------------------------------------

class AnthropicStreamDecoder(StreamDecoder):
    """Anthropic's stream events, each into the OpenAI chunks it stands for, as they arrive:
    message_start -> the role; a text or thinking delta -> content or reasoning; a tool_use
    block -> a tool call (its id and name, then its arguments as they come); message_delta ->
    the finish reason; message_stop -> the usage chunk; an error event -> OpenAI's error event."""

    def __init__(self) -> None:
        super().__init__()
        self._events = EventSplitter()
        self._make = ChunkMaker()
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._usage: Json = {}

    def feed(self, data: bytes) -> list[Chunk]:
        return self._read(self._events.feed(data))

    def finish(self) -> list[Chunk]:
        return self._read(self._events.flush())

    def _read(self, events: list[Any]) -> list[Chunk]:
        out: list[Chunk] = []
        for event in events:
            try:
                payload = orjson.loads(event.data)
            except ValueError:
                continue
            if isinstance(payload, dict):
                chunk = self._event(payload)
                if chunk is not None:
                    out.append(chunk)
        return out

    def _event(self, event: Json) -> Chunk | None:
        kind, make = event.get("type"), self._make
        if kind == "content_block_delta":
            delta = event.get("delta") or {}
            step = delta.get("type")
            if step == "text_delta":
                return make.delta({"content": delta.get("text", "")})
            if step == "input_json_delta":
                position = self._tools.get(event.get("index", -1))
                if position is not None:
                    return make.delta({"tool_calls": [{"index": position,
                                                       "function": {"arguments": delta.get("partial_json", "")}}]})
            elif step == "thinking_delta":
                return make.delta({"reasoning_content": delta.get("thinking", "")})
            return None
        if kind == "content_block_start":
            block = event.get("content_block") or {}
            if block.get("type") == "tool_use":
                position = self._tools[event.get("index", len(self._tools))] = len(self._tools)
                return make.delta({"tool_calls": [{"index": position, "id": block.get("id"), "type": "function",
                                                   "function": {"name": block.get("name"), "arguments": ""}}]})
            if block.get("type") == "text" and block.get("text"):
                return make.delta({"content": block["text"]})
            return None
        if kind == "message_start":
            message = event.get("message") or {}
            make.id, make.model = str(message.get("id", "")), str(message.get("model", ""))
            self.model = make.model
            if isinstance(message.get("usage"), dict):
                self._usage.update(message["usage"])
            return make.delta({"role": "assistant", "content": ""})
        if kind == "message_delta":
            if isinstance(event.get("usage"), dict):  # cumulative counts
                self._usage.update({k: v for k, v in event["usage"].items() if v is not None})
            reason = (event.get("delta") or {}).get("stop_reason")
            return make.delta({}, FINISH.get(str(reason), "stop")) if reason else None
        if kind == "message_stop":
            self.complete = True
            self.usage = usage_to_openai(self._usage)
            return make.usage(self.usage) if self.usage is not None else None
        if kind == "error":
            error = event.get("error") or {}
            self.error = str(error.get("type") or "error")
            return {"error": {"message": str(error.get("message") or "the provider's stream failed"),
                              "type": "server_error", "code": self.error}}
        return None  # ping, content_block_stop, and events added later


class AnthropicStreamEncoder(StreamEncoder):
    """OpenAI chunks written as Anthropic's stream events, for a client of the Messages API:
    message_start at the first chunk, a content block per run of text and per tool call
    (started, its deltas, stopped), then message_delta (stop reason, usage) and message_stop at
    the end; an error event where the provider's stream failed or ended early."""

    def __init__(self) -> None:
        self._started = False
        self._block = -1  # the index of the open content block (-1: none)
        self._kind = ""  # "text" or "tool" (the open block's)
        self._tool = -1  # the open tool block's tool call index
        self._blocks = 0
        self._stop = "end_turn"
        self._usage: Json | None = None
        self._failed = False
        self._id, self._model = "", ""

    def encode(self, chunks: list[Chunk]) -> bytes:
        out: list[bytes] = []
        for chunk in chunks:
            if "error" in chunk and not chunk.get("choices"):
                error = chunk["error"] if isinstance(chunk["error"], dict) else {}
                out.append(self._start())
                out.append(_event("error", {"type": "error", "error": {
                    "type": "overloaded_error" if error.get("code") == "overloaded_error" else "api_error",
                    "message": str(error.get("message") or "the provider's stream failed")}}))
                self._failed = True
                continue
            if not self._id:
                self._id, self._model = str(chunk.get("id") or ""), str(chunk.get("model") or "")
            if chunk.get("usage"):
                self._usage = chunk["usage"]
            for choice in chunk.get("choices") or ():
                if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                    continue  # Anthropic's answers have one choice
                out.append(self._start())
                delta = choice.get("delta") or {}
                text = delta.get("content")
                if isinstance(text, str) and text:
                    out.append(self._open("text", -1, {"type": "text", "text": ""}))
                    out.append(_event("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                              "delta": {"type": "text_delta", "text": text}}))
                for call in delta.get("tool_calls") or ():
                    out.append(self._tool_piece(call))
                if choice.get("finish_reason"):
                    self._stop = STOP.get(choice["finish_reason"], "end_turn")
        return b"".join(out)

    def _start(self) -> bytes:
        if self._started:
            return b""
        self._started = True
        return _event("message_start", {"type": "message_start", "message": {
            "id": self._id, "type": "message", "role": "assistant", "model": self._model, "content": [],
            "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": 0, "output_tokens": 0}}})

    def _open(self, kind: str, tool: int, block: Json) -> bytes:
        if self._block >= 0 and self._kind == kind and self._tool == tool:
            return b""
        closed = self._close()
        self._block, self._kind, self._tool = self._blocks, kind, tool
        self._blocks += 1
        return closed + _event("content_block_start", {"type": "content_block_start", "index": self._block,
                                                       "content_block": block})

    def _close(self) -> bytes:
        if self._block < 0:
            return b""
        index, self._block = self._block, -1
        return _event("content_block_stop", {"type": "content_block_stop", "index": index})

    def _tool_piece(self, call: object) -> bytes:
        if not isinstance(call, dict):
            return b""
        position = call.get("index", 0)
        found = call.get("function")
        function: Json = found if isinstance(found, dict) else {}
        opened = b""
        if call.get("id") is not None or not (self._kind == "tool" and self._tool == position):
            opened = self._open("tool", position, {"type": "tool_use", "id": call.get("id") or "",
                                                   "name": function.get("name") or "", "input": {}})
        piece = function.get("arguments")
        if not piece:
            return opened
        return opened + _event("content_block_delta", {"type": "content_block_delta", "index": self._block,
                                                       "delta": {"type": "input_json_delta", "partial_json": piece}})

    def finish(self, complete: bool) -> bytes:
        if self._failed:
            return b""
        out = [self._start(), self._close()]
        if not complete:
            self._failed = True
            out.append(_event("error", {"type": "error", "error": {"type": "api_error",
                                                                   "message": INCOMPLETE_MESSAGE}}))
            return b"".join(out)
        counted = usage_to_anthropic(self._usage)
        out.append(_event("message_delta", {"type": "message_delta",
                                            "delta": {"stop_reason": self._stop, "stop_sequence": None},
                                            "usage": counted}))
        out.append(_event("message_stop", {"type": "message_stop"}))
        return b"".join(out)


def _event(name: str, data: Json) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
