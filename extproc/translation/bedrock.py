"""OpenAI's chat API -> Amazon Bedrock's Converse API and its answers back (shapes as botocore's
service model for `bedrock-runtime` gives them: `POST /model/{modelId}/converse` and
`/converse-stream`, `messages` of content blocks, `inferenceConfig`, `toolConfig`, `output`,
`stopReason`, `usage`; a stream in AWS's binary event-stream encoding), and every request signed
with SigV4 (`sign`, botocore's signer), per attempt.

The request: system and developer messages as `system`, images as bytes (`data:` URLs; Converse
takes no image URL), tool calls as `toolUse` blocks and tool results as `toolResult` blocks in the
user's turn, consecutive turns of one role joined (Converse wants them alternating), the sampling
settings in `inferenceConfig`, tools as `toolSpec`s. The answer: text, reasoning and tool uses;
the stream's events (messageStart, contentBlockStart/Delta/Stop, messageStop, metadata and the
exceptions) each into OpenAI chunks, decoded by botocore's event-stream parser.

Usage: `inputTokens` leaves out the prompt's tokens read from or written to the cache; OpenAI's
`prompt_tokens` includes them (`cacheReadInputTokens` counted apart as cached).
"""

from __future__ import annotations

import logging
from typing import Any

import orjson

from ..policy.table import ApiSettings
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
    one_choice,
    stop_sequences,
    text_of,
    unsupported,
)

log = logging.getLogger(__name__)

API = "Bedrock's Converse API"
SERVICE = "bedrock"  # the SigV4 signing name of bedrock-runtime
EVENT_STREAM = "application/vnd.amazon.eventstream"
FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/gif": "gif", "image/webp": "webp"}
FINISH = {"end_turn": "stop", "stop_sequence": "stop", "tool_use": "tool_calls", "max_tokens": "length",
          "guardrail_intervened": "content_filter", "content_filtered": "content_filter",
          "model_context_window_exceeded": "length"}


def sign(settings: ApiSettings, host: str, path: str, body: bytes) -> tuple[tuple[str, str], ...]:
    """The SigV4 headers of one request (authorization, x-amz-date, and the session token where
    there is one), for botocore's signer over its method, host, path, content type and body: a
    new signature per attempt, as each attempt has its own time and may have its own body. The
    headers go to the provider only; the gateway never logs them."""
    # botocore is imported where a Bedrock provider is used: it adds a few hundred milliseconds to
    # the start of every process (each worker's too) that would import it with this module
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    credentials = Credentials(settings.access_key_id, settings.secret_access_key, settings.session_token)
    request = AWSRequest(method="POST", url=f"https://{host}{path}", data=body,
                         headers={"content-type": "application/json"})
    SigV4Auth(credentials, SERVICE, settings.region).add_auth(request)
    signed = [("authorization", request.headers["Authorization"]), ("x-amz-date", request.headers["X-Amz-Date"])]
    if settings.session_token:
        signed.append(("x-amz-security-token", settings.session_token))
    return tuple(signed)


def usage_to_openai(counted: object) -> dict[str, Any] | None:
    if not isinstance(counted, dict):
        return None
    read = _int(counted.get("cacheReadInputTokens"))
    written = _int(counted.get("cacheWriteInputTokens"))
    prompt = _int(counted.get("inputTokens")) + read + written
    return usage(prompt, _int(counted.get("outputTokens")), read if "cacheReadInputTokens" in counted else None)


def _int(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


# --- requests -----------------------------------------------------------------------------------

def to_converse_request(data: Json) -> Json:
    """An OpenAI chat request as a Converse request (the model and the stream go in the path)."""
    one_choice(data, API)
    system: list[Json] = []
    turns: list[Json] = []

    def add(role: str, blocks: list[Json]) -> None:
        if not blocks:
            return
        if turns and turns[-1]["role"] == role:
            turns[-1]["content"].extend(blocks)
        else:
            turns.append({"role": role, "content": blocks})

    for i, message in enumerate(messages_of(data)):
        role, where = message["role"], f"messages[{i}]"
        content = message.get("content")
        if role in ("system", "developer"):
            text = text_of(content, where)
            if text:
                system.append({"text": text})
        elif role == "user":
            add("user", [_block(part, f"{where}.content[{j}]") for j, part in enumerate(content_parts(content, where))
                         if not (part.get("type") == "text" and not part.get("text"))])
        elif role == "assistant":
            blocks = [_block(part, f"{where}.content[{j}]") for j, part in enumerate(content_parts(content, where))
                      if not (part.get("type") == "text" and not part.get("text"))]
            for j, call in enumerate(message.get("tool_calls") or ()):
                if not isinstance(call, dict) or not isinstance(call.get("id"), str):
                    raise invalid(f"{where}.tool_calls[{j}] needs an id")
                args = arguments(call, f"{where}.tool_calls[{j}]")
                blocks.append({"toolUse": {"toolUseId": call["id"], "name": call["function"]["name"], "input": args}})
            add("assistant", blocks)
        elif role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise invalid(f"{where}: a tool message needs tool_call_id")
            add("user", [{"toolResult": {"toolUseId": message["tool_call_id"],
                                         "content": [{"text": text_of(content, where)}]}}])
        else:
            raise unsupported(f"{where}: role {role!r}", API)
    if not turns:
        raise invalid("messages: at least one user or assistant message is needed")
    out: Json = {"messages": turns}
    if system:
        out["system"] = system
    config: Json = {}
    limit = max_tokens(data)
    if limit is not None:
        config["maxTokens"] = limit
    for key, name in (("temperature", "temperature"), ("top_p", "topP")):
        if data.get(key) is not None:
            config[name] = data[key]
    stops = stop_sequences(data)
    if stops:
        config["stopSequences"] = stops
    if config:
        out["inferenceConfig"] = config
    tools = functions(data, API)
    if tools:
        specs = [{"toolSpec": {"name": f["name"], **({"description": f["description"]} if f.get("description") else {}),
                               "inputSchema": {"json": f.get("parameters") or {"type": "object", "properties": {}}}}}
                 for f in tools]
        tool_config: Json = {"tools": specs}
        choice = data.get("tool_choice")
        if choice == "auto":
            tool_config["toolChoice"] = {"auto": {}}
        elif choice == "required":
            tool_config["toolChoice"] = {"any": {}}
        elif isinstance(choice, dict) and isinstance(choice.get("function"), dict) \
                and isinstance(choice["function"].get("name"), str):
            tool_config["toolChoice"] = {"tool": {"name": choice["function"]["name"]}}
        elif choice not in (None, "none"):
            raise invalid("'tool_choice' must be none, auto, required or a function", "invalid_tool_choice")
        out["toolConfig"] = tool_config
    return out


def _block(part: Json, where: str) -> Json:
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise invalid(f"{where}: a text part needs text")
        return {"text": part["text"]}
    if kind == "image_url":
        media, data = image_url(part, where)
        if media is None:
            raise unsupported(f"{where}: an image by URL (send it as a data: URL)", API)
        if media not in FORMATS:
            raise unsupported(f"{where}: an image of type {media}", API)
        return {"image": {"format": FORMATS[media], "source": {"bytes": data}}}
    raise unsupported(f"{where}: a content part of type {kind!r}", API)


# --- answers ------------------------------------------------------------------------------------

def answer_to_openai(answer: object, model: str = "", answer_id: str = "") -> Json | None:
    """A Converse answer as an OpenAI chat answer (None: not one). Converse names neither the
    model nor an id: the request's model, and the provider's request id where known."""
    if not isinstance(answer, dict) or not isinstance(answer.get("output"), dict):
        return None
    message = answer["output"].get("message") if isinstance(answer["output"].get("message"), dict) else {}
    texts, reasoning, calls = [], [], []
    for block in message.get("content") or ():
        if not isinstance(block, dict):
            continue
        if isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif isinstance(block.get("toolUse"), dict):
            use = block["toolUse"]
            calls.append({"id": use.get("toolUseId"), "type": "function", "function": {
                "name": use.get("name"), "arguments": orjson.dumps(use.get("input") or {}).decode()}})
        elif isinstance(block.get("reasoningContent"), dict):
            text = (block["reasoningContent"].get("reasoningText") or {}).get("text")
            if isinstance(text, str):
                reasoning.append(text)
    reply: Json = {"role": "assistant", "content": "".join(texts) if texts or not calls else None}
    if reasoning:
        reply["reasoning_content"] = "".join(reasoning)
    if calls:
        reply["tool_calls"] = calls
    out: Json = {"id": answer_id, "object": "chat.completion", "created": 0, "model": model,
                 "choices": [{"index": 0, "message": reply, "logprobs": None,
                              "finish_reason": FINISH.get(str(answer.get("stopReason")), "stop")}]}
    counted = usage_to_openai(answer.get("usage"))
    if counted is not None:
        out["usage"] = counted
    return out


def error_to_openai(status: int, body: object, error_kind: str = "") -> Json:
    """A Bedrock error answer (`{"message": ...}`, its type in the `x-amzn-errortype` header)
    as OpenAI's error (the type kept as the code)."""
    message = body.get("message") or body.get("Message") if isinstance(body, dict) else None
    code = error_kind.split(":", 1)[0] or str(status)
    return {"error": {"message": str(message or "the provider failed"), "type": openai_error_type(status),
                      "code": code}}


class BedrockStreamDecoder(StreamDecoder):
    """ConverseStream's binary events, decoded by botocore as their bytes arrive, each into
    OpenAI chunks: messageStart -> the role; a text or reasoning delta -> content or reasoning;
    a toolUse start -> a tool call (id, name), its input deltas -> its arguments; messageStop ->
    the finish reason; metadata (the last event) -> the usage chunk; an exception -> OpenAI's
    error event."""

    def __init__(self, model: str = "", answer_id: str = "") -> None:
        from botocore.eventstream import EventStreamBuffer  # where a Bedrock stream is read (see `sign`)

        super().__init__()
        self._buffer = EventStreamBuffer()
        self._make = ChunkMaker(answer_id, model)
        self.model = model
        self._tools: dict[int, int] = {}  # content block index -> tool call index
        self._broken = False

    def feed(self, data: bytes) -> list[Chunk]:
        from botocore.eventstream import ParserError

        if self._broken:
            return []
        self._buffer.add_data(data)
        out: list[Chunk] = []
        try:
            for message in self._buffer:
                chunk = self._message(message.headers, message.payload)
                if chunk is not None:
                    out.append(chunk)
        except ParserError as exc:  # a corrupt frame: nothing after it can be read
            log.warning("a Bedrock event stream could not be read: %s", type(exc).__name__)
            self._broken = True
            self.error = "corrupt_event_stream"
            out.append({"error": {"message": "the provider's event stream could not be read", "type": "server_error",
                                  "code": self.error}})
        return out

    def _message(self, headers: dict[str, Any], payload: bytes) -> Chunk | None:
        try:
            event = orjson.loads(payload) if payload else {}
        except ValueError:
            event = {}
        if not isinstance(event, dict):
            event = {}
        kind = headers.get(":message-type")
        if kind in ("exception", "error"):
            self.error = str(headers.get(":exception-type") or headers.get(":error-code") or "error")
            message = event.get("message") or headers.get(":error-message") or "the provider's stream failed"
            return {"error": {"message": str(message), "type": "server_error", "code": self.error}}
        name, make = headers.get(":event-type"), self._make
        if name == "contentBlockDelta":
            delta = event.get("delta") or {}
            if isinstance(delta.get("text"), str):
                return make.delta({"content": delta["text"]})
            if isinstance(delta.get("toolUse"), dict):
                position = self._tools.get(event.get("contentBlockIndex", -1))
                if position is not None:
                    return make.delta({"tool_calls": [{"index": position, "function": {
                        "arguments": delta["toolUse"].get("input", "")}}]})
            if isinstance(delta.get("reasoningContent"), dict) and isinstance(delta["reasoningContent"].get("text"),
                                                                               str):
                return make.delta({"reasoning_content": delta["reasoningContent"]["text"]})
            return None
        if name == "contentBlockStart":
            use = (event.get("start") or {}).get("toolUse")
            if isinstance(use, dict):
                position = self._tools[event.get("contentBlockIndex", len(self._tools))] = len(self._tools)
                return make.delta({"tool_calls": [{"index": position, "id": use.get("toolUseId"), "type": "function",
                                                   "function": {"name": use.get("name"), "arguments": ""}}]})
            return None
        if name == "messageStart":
            return make.delta({"role": event.get("role", "assistant"), "content": ""})
        if name == "messageStop":
            return make.delta({}, FINISH.get(str(event.get("stopReason")), "stop"))
        if name == "metadata":
            self.complete = True
            self.usage = usage_to_openai(event.get("usage"))
            return make.usage(self.usage) if self.usage is not None else None
        return None  # contentBlockStop, and events added later
