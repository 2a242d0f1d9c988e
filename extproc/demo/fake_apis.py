"""The fake provider's other APIs: Anthropic's Messages API, the Gemini API, Bedrock's Converse API
(SigV4 checked with botocore's signer, streams in AWS's binary event-stream encoding) and Azure
OpenAI, each as strict about its requests as the real one is (from each API's reference: an
Anthropic request without `max_tokens` or with a `system` message is refused, an unknown field
is refused, Bedrock's body is checked against botocore's own model of the Converse API and its
signature recomputed, Azure needs its deployment, `api-version` and `api-key`).

`FakeProvider(api=...)` answers in that API (`extproc.demo.fake_provider`); the same steering
headers as the OpenAI fake (`x-fake-reply`, `x-fake-status`, `x-fake-fail`, `x-fake-cached-tokens`,
`x-fake-stream-error`, `x-fake-event-delay`, `x-fake-split`), and:
  x-fake-tool: 1          answer with a call of the request's first tool (input `{"city": "Paris"}`)
  x-fake-end-early: 1     a stream that ends (cleanly) before its last events
"""

from __future__ import annotations

import base64
import binascii
import datetime
import io
import json
import re
import socket
import struct
import time
from typing import Any, Protocol
from urllib.parse import parse_qs, unquote, urlsplit


class _Handler(Protocol):
    """What these fakes use of the OpenAI fake's HTTP handler (`fake_provider._Handler`, which
    calls `handle`): named here so that this module does not import the one that imports it."""

    fake: Any  # its FakeProvider: name, api, keys, region, deployments
    recorded: Any  # the request as the fake records it (RecordedRequest)
    path: str
    command: str
    wfile: io.BufferedIOBase
    connection: socket.socket
    close_connection: bool

    def send_response(self, code: int, message: str | None = None) -> None: ...

    def send_header(self, keyword: str, value: str) -> None: ...

    def end_headers(self) -> None: ...

    def _chunk(self, data: bytes) -> None: ...


TOOL_INPUT = {"city": "Paris"}


def words(text: str) -> int:
    return len(text.split())


def reply_for(handler: _Handler, model: str, headers: dict[str, str]) -> str:
    return headers.get("x-fake-reply") or f"Hello! I am {model}, served by {handler.fake.name}."


def handle(handler: _Handler, headers: dict[str, str], raw: bytes, body: Any) -> bool:
    """Answer a request in the fake's API; False where the OpenAI fake goes on (Azure, once its
    own checks pass)."""
    api = handler.fake.api
    if api == "anthropic":
        Anthropic(handler, headers, body).answer()
    elif api == "gemini":
        Gemini(handler, headers, body).answer()
    elif api == "bedrock":
        Bedrock(handler, headers, raw, body).answer()
    elif api == "azure":
        return Azure(handler, headers, body).refused()
    else:
        return False
    return True


class _Api:
    def __init__(self, handler: _Handler, headers: dict[str, str], body: Any):
        self.h, self.headers, self.body = handler, headers, body

    def send_json(self, status: int, payload: Any, extra: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.h.send_response(status)
        self.h.send_header("content-type", "application/json")
        for key, value in (extra or {}).items():
            self.h.send_header(key, value)
        self.h.send_header("content-length", str(len(data)))
        self.h.end_headers()
        self.h.wfile.write(data)

    def stream(self, content_type: str, events: list[bytes]) -> None:
        """Events as a chunked stream, steered like the OpenAI fake's (delays, splits, a cut,
        an early end)."""
        h, headers = self.h, self.headers
        h.send_response(200)
        h.send_header("content-type", content_type)
        h.send_header("transfer-encoding", "chunked")
        h.end_headers()
        delay = float(headers.get("x-fake-event-delay", 0))
        cut = int(headers["x-fake-cut"]) if "x-fake-cut" in headers else None
        if headers.get("x-fake-end-early") == "1":
            events = events[:3]
        for i, payload in enumerate(events):
            if cut is not None and i == cut:  # the connection dropped mid-stream
                h.close_connection = True
                h.connection.shutdown(socket.SHUT_RDWR)
                return
            if i and delay:
                time.sleep(delay)
            if headers.get("x-fake-split") == "1":
                half = len(payload) // 2
                h._chunk(payload[:half])
                time.sleep(0.05)
                h._chunk(payload[half:])
            else:
                h._chunk(payload)
            h.recorded.event_times.append(time.time())
        h._chunk(b"")

    def cached(self) -> int | None:
        return int(self.headers["x-fake-cached-tokens"]) if "x-fake-cached-tokens" in self.headers else None


# --- Anthropic's Messages API ----------------------------------------------------------------------

_ANTHROPIC_FIELDS = {"model", "messages", "max_tokens", "system", "stop_sequences", "stream", "temperature",
                     "top_p", "top_k", "tools", "tool_choice", "metadata", "thinking", "service_tier"}
_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                    529: "overloaded_error"}
_IMAGE_TYPES = ("image/jpeg", "image/png", "image/gif", "image/webp")


class AnthropicRefusal(Exception):
    pass


class Anthropic(_Api):
    def error(self, status: int, message: str) -> None:
        kind = _ANTHROPIC_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
        self.send_json(status, {"type": "error", "error": {"type": kind, "message": message}},
                       {"request-id": "req_fake"})

    def answer(self) -> None:
        fake, headers = self.h.fake, self.headers
        path = urlsplit(self.h.path).path
        if not path.endswith("/messages"):
            return self.error(404, f"Not found: {path}")
        if fake.api_key and headers.get("x-api-key") != fake.api_key:
            return self.error(401, "invalid x-api-key")
        if not headers.get("anthropic-version"):
            return self.error(400, "anthropic-version: header is required")
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            return self.error(status, f"fake provider answered {status} as asked")
        try:
            self.check()
        except AnthropicRefusal as refusal:
            return self.error(400, str(refusal))
        body = self.body
        model, reply = body["model"], reply_for(self.h, body["model"], headers)
        prompt = words(_system_text(body.get("system"))) + sum(_anthropic_words(m) for m in body["messages"])
        cached = self.cached() or 0
        usage = {"input_tokens": prompt - cached, "output_tokens": words(reply),
                 "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached}
        tool = body["tools"][0] if headers.get("x-fake-tool") == "1" and body.get("tools") else None
        message_id = f"msg_{fake.name}_{len(fake.requests)}"
        if body.get("stream") is True:
            return self.stream("text/event-stream", self._events(message_id, model, reply, usage, tool))
        content: list[dict[str, Any]] = [{"type": "text", "text": reply}]
        if tool is not None:
            content.append({"type": "tool_use", "id": "toolu_fake_1", "name": tool["name"], "input": TOOL_INPUT})
        self.send_json(200, {"id": message_id, "type": "message", "role": "assistant", "model": model,
                             "content": content, "stop_reason": "tool_use" if tool else "end_turn",
                             "stop_sequence": None, "usage": usage})

    def _events(self, message_id: str, model: str, reply: str, usage: dict[str, int],
                tool: dict[str, Any] | None) -> list[bytes]:
        def event(name: str, data: dict[str, Any]) -> bytes:
            return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()

        start_usage = {**usage, "output_tokens": 1}
        events = [event("message_start", {"type": "message_start", "message": {
                      "id": message_id, "type": "message", "role": "assistant", "model": model, "content": [],
                      "stop_reason": None, "stop_sequence": None, "usage": start_usage}}),
                  event("content_block_start", {"type": "content_block_start", "index": 0,
                                                "content_block": {"type": "text", "text": ""}}),
                  event("ping", {"type": "ping"})]
        pieces = reply.split()
        for i, word in enumerate(pieces):
            text = word if i == len(pieces) - 1 else word + " "
            events.append(event("content_block_delta", {"type": "content_block_delta", "index": 0,
                                                        "delta": {"type": "text_delta", "text": text}}))
        if self.headers.get("x-fake-stream-error") == "1":
            return [*events[:4], event("error", {"type": "error", "error": {
                "type": "overloaded_error", "message": "Overloaded"}})]
        events.append(event("content_block_stop", {"type": "content_block_stop", "index": 0}))
        if tool is not None:
            arguments = json.dumps(TOOL_INPUT)
            events += [event("content_block_start", {"type": "content_block_start", "index": 1, "content_block": {
                          "type": "tool_use", "id": "toolu_fake_1", "name": tool["name"], "input": {}}}),
                       *(event("content_block_delta", {"type": "content_block_delta", "index": 1, "delta": {
                           "type": "input_json_delta", "partial_json": piece}})
                         for piece in (arguments[:5], arguments[5:])),
                       event("content_block_stop", {"type": "content_block_stop", "index": 1})]
        events += [event("message_delta", {"type": "message_delta", "delta": {
                       "stop_reason": "tool_use" if tool else "end_turn", "stop_sequence": None},
                       "usage": {"output_tokens": usage["output_tokens"]}}),
                   event("message_stop", {"type": "message_stop"})]
        return events

    def check(self) -> None:
        """As Anthropic's API checks a request (the errors it answers, in its words)."""
        body = self.body
        if not isinstance(body, dict):
            raise AnthropicRefusal("body: the request body is not valid JSON")
        for key in body:
            if key not in _ANTHROPIC_FIELDS:
                raise AnthropicRefusal(f"{key}: Extra inputs are not permitted")
        for key in ("model", "max_tokens", "messages"):
            if key not in body:
                raise AnthropicRefusal(f"{key}: Field required")
        if not isinstance(body["max_tokens"], int) or body["max_tokens"] < 1:
            raise AnthropicRefusal("max_tokens: Input should be a valid integer greater than 0")
        for key, top in (("temperature", 1.0), ("top_p", 1.0)):
            value = body.get(key)
            if value is not None and not (isinstance(value, int | float) and 0 <= value <= top):
                raise AnthropicRefusal(f"{key}: Input should be less than or equal to {top}")
        if "stop_sequences" in body and not (isinstance(body["stop_sequences"], list)
                                             and all(isinstance(s, str) for s in body["stop_sequences"])):
            raise AnthropicRefusal("stop_sequences: Input should be a valid list of strings")
        system = body.get("system")
        if system is not None and not isinstance(system, str):
            if not isinstance(system, list) or not all(isinstance(b, dict) and b.get("type") == "text"
                                                       and isinstance(b.get("text"), str) for b in system):
                raise AnthropicRefusal("system: Input should be a valid string or a list of text blocks")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            raise AnthropicRefusal("messages: at least one message is required")
        tool_uses: set[str] = set()
        for i, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            if role == "system":
                raise AnthropicRefusal(f'messages.{i}.role: Unexpected role "system". The Messages API accepts a '
                                       'top-level `system` parameter, not "system" as an input message role.')
            if role not in ("user", "assistant"):
                raise AnthropicRefusal(f"messages.{i}.role: Input should be 'user' or 'assistant'")
            content = message.get("content")
            if isinstance(content, str):
                if not content:
                    raise AnthropicRefusal(f"messages.{i}: text content blocks must be non-empty")
                continue
            if not isinstance(content, list) or not content:
                raise AnthropicRefusal(f"messages.{i}.content: Input should be a valid string or a non-empty list")
            seen_other = False
            used_here: set[str] = set()
            for j, block in enumerate(content):
                kind = block.get("type") if isinstance(block, dict) else None
                where = f"messages.{i}.content.{j}"
                if kind == "text":
                    if not isinstance(block.get("text"), str) or not block["text"]:
                        raise AnthropicRefusal(f"{where}: text content blocks must be non-empty")
                    seen_other = True
                elif kind == "image" and role == "user":
                    source = block.get("source") or {}
                    if source.get("type") == "base64":
                        if source.get("media_type") not in _IMAGE_TYPES:
                            raise AnthropicRefusal(f"{where}.source.media_type: Input should be one of "
                                                   + ", ".join(_IMAGE_TYPES))
                        try:
                            base64.b64decode(source.get("data") or "", validate=True)
                        except (binascii.Error, ValueError):
                            raise AnthropicRefusal(f"{where}.source.data: invalid base64 data") from None
                    elif not (source.get("type") == "url" and isinstance(source.get("url"), str)):
                        raise AnthropicRefusal(f"{where}.source: Input tag does not match any of 'base64', 'url'")
                    seen_other = True
                elif kind == "tool_use" and role == "assistant":
                    if not isinstance(block.get("id"), str) or not isinstance(block.get("name"), str) \
                            or not isinstance(block.get("input"), dict):
                        raise AnthropicRefusal(f"{where}: tool_use needs id, name and an input object")
                    used_here.add(block["id"])
                elif kind == "tool_result" and role == "user":
                    if seen_other:
                        raise AnthropicRefusal(f"{where}: tool_result blocks must come first in the user message")
                    if block.get("tool_use_id") not in tool_uses:
                        raise AnthropicRefusal(f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                                               f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                                               "corresponding `tool_use` block in the previous message.")
                else:
                    raise AnthropicRefusal(f"{where}.type: unexpected content block {kind!r} in a {role} message")
            tool_uses = used_here
        for i, tool in enumerate(body.get("tools") or ()):
            schema = tool.get("input_schema") if isinstance(tool, dict) else None
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not isinstance(schema, dict) \
                    or schema.get("type") != "object":
                raise AnthropicRefusal(f"tools.{i}.input_schema: Field required (a JSON schema of type object)")
        choice = body.get("tool_choice")
        if choice is not None:
            if not isinstance(choice, dict) or choice.get("type") not in ("auto", "any", "tool", "none"):
                raise AnthropicRefusal("tool_choice: Input tag does not match any of 'auto', 'any', 'tool', 'none'")
            if choice["type"] == "tool" and not isinstance(choice.get("name"), str):
                raise AnthropicRefusal("tool_choice.tool.name: Field required")


def _system_text(system: Any) -> str:
    if isinstance(system, list):
        return " ".join(b.get("text", "") for b in system if isinstance(b, dict))
    return system or ""


def _anthropic_words(message: dict[str, Any]) -> int:
    content = message.get("content")
    if isinstance(content, str):
        return words(content)
    total = 0
    for block in content or ():
        if block.get("type") == "text":
            total += words(block["text"])
        elif block.get("type") == "tool_result":
            result = block.get("content")
            total += words(result if isinstance(result, str) else _system_text(result))
    return total


# --- the Gemini API ------------------------------------------------------------------------------

_GEMINI_FIELDS = {"contents", "systemInstruction", "generationConfig", "tools", "toolConfig", "safetySettings",
                  "cachedContent", "labels"}
_GEMINI_CONFIG = {"temperature", "topP", "topK", "maxOutputTokens", "stopSequences", "candidateCount", "seed",
                  "presencePenalty", "frequencyPenalty", "responseMimeType", "responseSchema", "responseJsonSchema",
                  "thinkingConfig", "responseModalities", "responseLogprobs", "logprobs"}
_GEMINI_PART = {"text", "inlineData", "fileData", "functionCall", "functionResponse", "executableCode",
                "codeExecutionResult"}
_GEMINI_STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED",
                  500: "INTERNAL", 503: "UNAVAILABLE", 504: "DEADLINE_EXCEEDED"}
_GEMINI_PATH = re.compile(r"^/(v1|v1beta|v1alpha)/models/([^/:]+):(generateContent|streamGenerateContent)$")


class GeminiRefusal(Exception):
    pass


class Gemini(_Api):
    def error(self, status: int, message: str) -> None:
        self.send_json(status, {"error": {"code": status, "message": message,
                                          "status": _GEMINI_STATUS.get(status, "INTERNAL" if status >= 500
                                                                       else "FAILED_PRECONDITION")}})

    def answer(self) -> None:
        fake, headers = self.h.fake, self.headers
        split = urlsplit(self.h.path)
        found = _GEMINI_PATH.match(split.path)
        if found is None:
            return self.error(404, f"The requested URL {split.path} was not found on this server.")
        if fake.api_key and headers.get("x-goog-api-key") != fake.api_key:
            return self.error(403, "Method doesn't allow unregistered callers (callers without established "
                                   "identity). Please use API Key or other form of API consumer identity to call "
                                   "this API.")
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            return self.error(status, f"fake provider answered {status} as asked")
        try:
            self.check()
        except GeminiRefusal as refusal:
            return self.error(400, str(refusal))
        body = self.body
        model = unquote(found.group(2))
        streamed = found.group(3) == "streamGenerateContent"
        if streamed and parse_qs(split.query).get("alt") != ["sse"]:
            return self.error(400, "this fake streams only as server-sent events (alt=sse)")
        reply = reply_for(self.h, model, headers)
        prompt = sum(words(p.get("text", "")) for c in [body.get("systemInstruction") or {}, *body["contents"]]
                     for p in c.get("parts") or () if isinstance(p, dict))
        prompt += sum(words(str((p.get("functionResponse") or {}).get("response", {}).get("content", "")))
                      for c in body["contents"] for p in c["parts"] if "functionResponse" in p)
        n = (body.get("generationConfig") or {}).get("candidateCount", 1)
        usage: dict[str, int] = {"promptTokenCount": prompt, "candidatesTokenCount": words(reply) * n,
                                 "totalTokenCount": prompt + words(reply) * n}
        cached = self.cached()
        if cached is not None:
            usage["cachedContentTokenCount"] = cached
        tool = None
        if headers.get("x-fake-tool") == "1" and body.get("tools"):
            tool = body["tools"][0]["functionDeclarations"][0]
        response_id = f"fake-{fake.name}-{len(fake.requests)}"
        if streamed:
            return self.stream("text/event-stream", self._events(model, reply, usage, n, tool, response_id))
        parts: list[dict[str, Any]] = [{"text": reply}]
        if tool is not None:
            parts.append({"functionCall": {"name": tool["name"], "args": TOOL_INPUT}})
        candidates = [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": i}
                      for i in range(n)]
        self.send_json(200, {"candidates": candidates, "usageMetadata": usage, "modelVersion": model,
                             "responseId": response_id})

    def _events(self, model: str, reply: str, usage: dict[str, int], n: int, tool: dict[str, Any] | None,
                response_id: str) -> list[bytes]:
        def event(candidates: list[dict[str, Any]], counted: dict[str, int]) -> bytes:
            data = {"candidates": candidates, "usageMetadata": counted, "modelVersion": model,
                    "responseId": response_id}
            return f"data: {json.dumps(data)}\r\n\r\n".encode()  # as Gemini sends them

        partial = {"promptTokenCount": usage["promptTokenCount"], "totalTokenCount": usage["promptTokenCount"]}
        pieces = reply.split()
        events = []
        for k, word in enumerate(pieces):
            text = word if k == len(pieces) - 1 else word + " "
            events.append(event([{"content": {"role": "model", "parts": [{"text": text}]}, "index": i}
                                 for i in range(n)], partial))
        if self.headers.get("x-fake-stream-error") == "1":
            failed = {"error": {"code": 500, "message": "Internal error", "status": "INTERNAL"}}
            return [*events[:1], f"data: {json.dumps(failed)}\r\n\r\n".encode()]
        last: list[dict[str, Any]] = [{"content": {"role": "model", "parts": [
                                           *([{"functionCall": {"name": tool["name"], "args": TOOL_INPUT}}]
                                             if tool else [{"text": ""}])]},
                                       "finishReason": "STOP", "index": i} for i in range(n)]
        events.append(event(last, usage))
        return events

    def check(self) -> None:
        body = self.body
        if not isinstance(body, dict):
            raise GeminiRefusal("Invalid JSON payload received.")
        for key in body:
            if key not in _GEMINI_FIELDS:
                raise GeminiRefusal(f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.')
        contents = body.get("contents")
        if not isinstance(contents, list) or not contents:
            raise GeminiRefusal("* GenerateContentRequest.contents: contents is not specified")
        for i, content in enumerate([*contents, *([body["systemInstruction"]] if "systemInstruction" in body
                                                  else [])]):
            if not isinstance(content, dict) or content.get("role", "user") not in ("user", "model"):
                raise GeminiRefusal(f"* GenerateContentRequest.contents[{i}].role: Please use a valid role: user, "
                                    "model.")
            parts = content.get("parts")
            if not isinstance(parts, list) or not parts:
                raise GeminiRefusal(f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be "
                                    "empty.")
            for j, part in enumerate(parts):
                kinds = [k for k in part if k in _GEMINI_PART] if isinstance(part, dict) else []
                unknown = [k for k in part if k not in _GEMINI_PART and k not in ("thought", "thoughtSignature")] \
                    if isinstance(part, dict) else ["?"]
                if unknown:
                    raise GeminiRefusal(f'Invalid JSON payload received. Unknown name "{unknown[0]}" at '
                                        f"'contents[{i}].parts[{j}]': Cannot find field.")
                if len(kinds) != 1:
                    raise GeminiRefusal(f"* GenerateContentRequest.contents[{i}].parts[{j}].data: required oneof "
                                        "field 'data' must have one initialized field")
                if "inlineData" in part:
                    data = part["inlineData"]
                    if not isinstance(data, dict) or not data.get("mimeType") or not isinstance(data.get("data"), str):
                        raise GeminiRefusal(f"* contents[{i}].parts[{j}].inline_data: mimeType and data are required")
                    try:
                        base64.b64decode(data["data"], validate=True)
                    except (binascii.Error, ValueError):
                        raise GeminiRefusal(f"Invalid value at 'contents[{i}].parts[{j}].inline_data.data' "
                                            "(TYPE_BYTES), Base64 decoding failed") from None
                if "functionResponse" in part:
                    response = part["functionResponse"]
                    if not isinstance(response.get("name"), str) or not isinstance(response.get("response"), dict):
                        raise GeminiRefusal(f"* contents[{i}].parts[{j}].function_response: name and a response "
                                            "object are required")
                if "functionCall" in part and not isinstance(part["functionCall"].get("name"), str):
                    raise GeminiRefusal(f"* contents[{i}].parts[{j}].function_call.name: name is required")
        config = body.get("generationConfig") or {}
        for key in config:
            if key not in _GEMINI_CONFIG:
                raise GeminiRefusal(f'Invalid JSON payload received. Unknown name "{key}" at \'generation_config\': '
                                    "Cannot find field.")
        for i, tool in enumerate(body.get("tools") or ()):
            for j, declaration in enumerate(tool.get("functionDeclarations") or ()):
                if not isinstance(declaration.get("name"), str):
                    raise GeminiRefusal(f"* tools[{i}].function_declarations[{j}].name: Name is required")
                if "parameters" in declaration and "parametersJsonSchema" in declaration:
                    raise GeminiRefusal(f"* tools[{i}].function_declarations[{j}]: parameters and "
                                        "parametersJsonSchema are mutually exclusive")


# --- Bedrock's Converse API ------------------------------------------------------------------------

_BEDROCK_PATH = re.compile(r"^/model/([^/]+)/(converse|converse-stream)$")


def _bedrock_model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("bedrock-runtime")


class Bedrock(_Api):
    """Bedrock's Converse API: the request's SigV4 signature recomputed with botocore's signer
    from the fake's own copy of the key pair; the body checked against botocore's model of the
    Converse API (what the AWS SDKs validate with)."""

    def __init__(self, handler: _Handler, headers: dict[str, str], raw: bytes, body: Any):
        super().__init__(handler, headers, body)
        self.raw = raw

    def error(self, status: int, kind: str, message: str) -> None:
        self.send_json(status, {"message": message}, {
            "x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/",
            "x-amzn-requestid": "fake-request-id"})

    def answer(self) -> None:
        fake, headers = self.h.fake, self.headers
        found = _BEDROCK_PATH.match(self.h.path)
        if found is None:
            return self.error(404, "UnknownOperationException", "Unknown operation")
        refused = self.signature_refused()
        if refused:
            kind = "InvalidSignatureException" if "signature" in refused else "UnrecognizedClientException"
            return self.error(403, kind, refused)
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            kind = "ThrottlingException" if status == 429 else "ValidationException" if status < 500 \
                else "InternalServerException"
            return self.error(status, kind, f"fake provider answered {status} as asked")
        model = unquote(found.group(1))
        problem = self.validation_problem(model)
        if problem:
            return self.error(400, "ValidationException", problem)
        body = self.body
        reply = reply_for(self.h, model, headers)
        prompt = sum(words(b.get("text", "")) for b in body.get("system") or ())
        for message in body["messages"]:
            for block in message["content"]:
                if "text" in block:
                    prompt += words(block["text"])
                elif "toolResult" in block:
                    prompt += sum(words(c.get("text", "")) for c in block["toolResult"]["content"])
        cached = self.cached() or 0
        usage = {"inputTokens": prompt - cached, "outputTokens": words(reply),
                 "totalTokens": prompt + words(reply)}
        if cached:
            usage["cacheReadInputTokens"] = cached
        tool = None
        if headers.get("x-fake-tool") == "1" and (body.get("toolConfig") or {}).get("tools"):
            tool = body["toolConfig"]["tools"][0]["toolSpec"]
        if found.group(2) == "converse-stream":
            return self.stream("application/vnd.amazon.eventstream", self._events(reply, usage, tool))
        content: list[dict[str, Any]] = [{"text": reply}]
        if tool is not None:
            content.append({"toolUse": {"toolUseId": "tooluse_fake_1", "name": tool["name"], "input": TOOL_INPUT}})
        self.send_json(200, {"output": {"message": {"role": "assistant", "content": content}},
                             "stopReason": "tool_use" if tool else "end_turn", "usage": usage,
                             "metrics": {"latencyMs": 1}}, {"x-amzn-requestid": f"fake-{fake.name}"})

    def _events(self, reply: str, usage: dict[str, int], tool: dict[str, Any] | None) -> list[bytes]:
        events = [frame("messageStart", {"role": "assistant"})]
        pieces = reply.split()
        for k, word in enumerate(pieces):
            text = word if k == len(pieces) - 1 else word + " "
            events.append(frame("contentBlockDelta", {"delta": {"text": text}, "contentBlockIndex": 0}))
        if self.headers.get("x-fake-stream-error") == "1":
            return [*events[:2], frame("modelStreamErrorException", {"message": "the model failed mid-stream"},
                                       "exception")]
        events.append(frame("contentBlockStop", {"contentBlockIndex": 0}))
        if tool is not None:
            arguments = json.dumps(TOOL_INPUT)
            events += [frame("contentBlockStart", {"start": {"toolUse": {"toolUseId": "tooluse_fake_1",
                                                                          "name": tool["name"]}},
                                                   "contentBlockIndex": 1}),
                       *(frame("contentBlockDelta", {"delta": {"toolUse": {"input": piece}}, "contentBlockIndex": 1})
                         for piece in (arguments[:5], arguments[5:])),
                       frame("contentBlockStop", {"contentBlockIndex": 1})]
        events += [frame("messageStop", {"stopReason": "tool_use" if tool else "end_turn"}),
                   frame("metadata", {"usage": usage, "metrics": {"latencyMs": 1}})]
        return events

    def signature_refused(self) -> str:
        """Why the request's SigV4 signature is refused ("" when it holds): recomputed with
        botocore's signer over the headers the request says it signed."""
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        fake, headers = self.h.fake, self.headers
        auth = headers.get("authorization", "")
        found = re.match(r"^AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/([^/]+)/aws4_request, "
                         r"SignedHeaders=([^,]+), Signature=([0-9a-f]{64})$", auth)
        if found is None:
            return "Missing Authentication Token"
        key_id, day, region, service, signed, signature = found.groups()
        if key_id != fake.aws_access_key_id:
            return "The security token included in the request is invalid."
        if region != fake.aws_region or service != "bedrock":
            return f"Credential should be scoped to a valid region ({fake.aws_region}) and service (bedrock)."
        stamp = headers.get("x-amz-date", "")
        try:
            when = datetime.datetime.strptime(stamp, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
        except ValueError:
            return "the request signature: x-amz-date is missing or invalid"
        if abs((datetime.datetime.now(datetime.UTC) - when).total_seconds()) > 300 or day != stamp[:8]:
            return "Signature expired: the request signature is too old or dated in the future"
        names = signed.split(";")
        if "host" not in names or "x-amz-date" not in names:
            return "the request signature must sign the host and x-amz-date headers"
        request = AWSRequest(method=self.h.command, url=f"https://{headers.get('host', '')}{self.h.path}",
                             data=self.raw, headers={name: headers.get(name, "") for name in names})
        request.context["timestamp"] = stamp
        signer = SigV4Auth(Credentials(fake.aws_access_key_id, fake.aws_secret_access_key,
                                       headers.get("x-amz-security-token")), "bedrock", region)
        expected = signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request)
        if expected != signature:
            return ("The request signature we calculated does not match the signature you provided. Check your "
                    "AWS Secret Access Key and signing method.")
        return ""

    def validation_problem(self, model: str) -> str:
        """What botocore's parameter validator says of the body against ConverseRequest ("" when
        nothing): byte fields come base64-encoded in the JSON body, as the SDKs send them."""
        from botocore.validate import ParamValidator

        body = self.body
        if not isinstance(body, dict):
            return "Malformed input request: the body is not a JSON object"
        params = json.loads(json.dumps(body))
        try:
            for message in params.get("messages") or ():
                for block in message.get("content") or ():
                    source = (block.get("image") or {}).get("source") if isinstance(block, dict) else None
                    if isinstance(source, dict) and isinstance(source.get("bytes"), str):
                        source["bytes"] = base64.b64decode(source["bytes"], validate=True)
        except (binascii.Error, ValueError, AttributeError):
            return "Malformed input request: invalid base64 image bytes"
        params["modelId"] = model
        shape = _bedrock_model().operation_model("Converse").input_shape
        report = ParamValidator().validate(params, shape)
        if report.has_errors():
            return "Malformed input request: " + report.generate_report().replace("\n", " ")
        wrong = _enum_problem(params, shape, "")  # botocore's validator leaves enums to the service
        if wrong:
            return f"Malformed input request: {wrong}"
        roles = [m["role"] for m in params["messages"]]
        if roles[0] != "user":
            return "A conversation must start with a user message. Try again with a conversation that starts with " \
                   "a user message."
        if any(a == b for a, b in zip(roles, roles[1:], strict=False)):
            return "A conversation must alternate between user and assistant roles. Make sure the conversation " \
                   "alternates between user and assistant roles and try again."
        return ""


def _enum_problem(value: Any, shape: Any, where: str) -> str:
    """A value outside its shape's enum (an image `format`, a `role`), as the service refuses it."""
    kind = shape.type_name
    if kind == "string" and shape.enum and value not in shape.enum:
        return f"{where}: {value!r} is not one of {', '.join(shape.enum)}"
    if kind == "structure" and isinstance(value, dict):
        for name, member in shape.members.items():
            if name in value:
                found = _enum_problem(value[name], member, f"{where}.{name}" if where else name)
                if found:
                    return found
    if kind == "list" and isinstance(value, list):
        for i, item in enumerate(value):
            found = _enum_problem(item, shape.member, f"{where}[{i}]")
            if found:
                return found
    return ""


def frame(event_type: str, payload: dict[str, Any], message_type: str = "event") -> bytes:
    """One message of AWS's event-stream encoding: the prelude (lengths and their CRC32), string
    headers, the JSON payload, the message's CRC32."""
    headers = {":message-type": message_type, ":content-type": "application/json"}
    headers[":exception-type" if message_type == "exception" else ":event-type"] = event_type
    raw_headers = b"".join(struct.pack("B", len(k)) + k.encode() + b"\x07" + struct.pack(">H", len(v)) + v.encode()
                           for k, v in headers.items())
    data = json.dumps(payload).encode()
    total = 12 + len(raw_headers) + len(data) + 4
    prelude = struct.pack(">II", total, len(raw_headers))
    prelude += struct.pack(">I", binascii.crc32(prelude))
    message = prelude + raw_headers + data
    return message + struct.pack(">I", binascii.crc32(message))


# --- Azure OpenAI --------------------------------------------------------------------------------

_AZURE_PATH = re.compile(r"^/openai/deployments/([^/]+)/(chat/completions|completions|embeddings)$")


class Azure(_Api):
    def refused(self) -> bool:
        """Azure's own checks (its path, deployment, api-version, api-key); True where one refused
        the request (answered), False to go on with OpenAI's answers."""
        fake, headers = self.h.fake, self.headers
        split = urlsplit(self.h.path)
        found = _AZURE_PATH.match(split.path)
        if found is None or "api-version" not in parse_qs(split.query):
            self.send_json(404, {"error": {"code": "404", "message": "Resource not found"}})
            return True
        if fake.api_key and headers.get("api-key") != fake.api_key:
            self.send_json(401, {"error": {"code": "401", "message": "Access denied due to invalid subscription key "
                                                                      "or wrong API endpoint."}})
            return True
        if unquote(found.group(1)) not in fake.azure_deployments:
            self.send_json(404, {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this "
                                           "resource does not exist."}})
            return True
        return False
