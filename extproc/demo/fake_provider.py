"""A local HTTPS stand-in for an OpenAI-compatible provider, for the demo and the tests (and, with
`api=`, for a provider of Anthropic's, Gemini's, Bedrock's or Azure OpenAI's API:
`extproc.demo.fake_apis`).

It answers chat completions with the model it was asked for, checks the API key, records
every request (path, headers, body, SNI), and is steered by request headers, as Envoy AI
Gateway's test upstream is:
  x-fake-status: 429     answer with that status and an OpenAI-style error
  x-fake-reply: text     the assistant's reply (default: the fake's `reply`, else a greeting naming the model)
  x-fake-echo: 1         the reply is the last message's text as the fake received it (what a policy masked)
  x-fake-delay: 1.5      wait that many seconds before answering
  x-fake-total-tokens: 17  report that many tokens in usage (about half prompt, half completion)
  x-fake-cached-tokens: 3  report that many of the prompt tokens as cached (prompt_tokens_details)
  x-fake-body-delay: 1   a JSON answer's body sent in four pieces, that many seconds apart
  x-fake-tool: 1         a call of the request's first tool (input `{"city": "Paris"}`) besides the reply
Besides chat (any path but the two below) it answers `.../embeddings` (vectors derived from
the input, as floats or base64 as asked) and `.../completions` (the legacy text completion).
A body with "stream": true is answered as server-sent events, further steered by:
  x-fake-event-delay: 0.2   seconds between events
  x-fake-split: 1           each event written in two pieces, a moment apart (an event split
                            across network chunks)
  x-fake-stream-error: 1    an error event after the first content event, then the end
One named fake only (the others answer normally), so that one provider fails and the next
answers within one request; several "name:failure" items may be given, comma-separated:
  x-fake-fail: a:503         fake `a` answers 503 (any status)
  x-fake-fail: a:delay=2     fake `a` waits 2 s before answering
  x-fake-fail: a:close       fake `a` closes the connection without answering
  x-fake-fail: a:cut=1       fake `a` streams 1 event, then closes the connection mid-stream
  x-fake-fail: a:503/2       ... only every second request fake `a` receives (1st, 3rd, ...)
  x-fake-retry-after: 60     an error answer carries `Retry-After: 60`
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from . import fake_apis


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any
    sni: str | None
    event_times: list[float] = field(default_factory=list)  # when each streamed event was sent


def count_tokens(text: str) -> int:
    """The fake's tokenizer: one token per whitespace-separated word. Deterministic on purpose."""
    return len(text.split())


def prompt_tokens(body: dict) -> int:
    if "messages" not in body:  # embeddings' input, completions' prompt: a string or a list of them
        texts = body.get("input", body.get("prompt", ""))
        return sum(count_tokens(str(t)) for t in (texts if isinstance(texts, list) else [texts]))
    return sum(count_tokens(_text(m.get("content", ""))) for m in body.get("messages", []) if isinstance(m, dict))


def _text(content: Any) -> str:
    """A message's text: its string, or its text parts joined."""
    if isinstance(content, list):
        return " ".join(part.get("text", "") for part in content if isinstance(part, dict))
    return str(content or "")


def _tool(body: dict, headers: dict[str, str]) -> dict[str, Any] | None:
    """With `x-fake-tool: 1`, a call of the request's first tool (input `{"city": "Paris"}`)."""
    tools = body.get("tools")
    if headers.get("x-fake-tool") != "1" or not tools:
        return None
    return {"id": "call_fake_1", "type": "function",
            "function": {"name": tools[0]["function"]["name"], "arguments": json.dumps(fake_apis.TOOL_INPUT)}}


def fake_embedding(text: str) -> list[float]:
    """A deterministic 4-dimensional vector for a text (a test can recompute it)."""
    return [float(len(text)), float(count_tokens(text)), float(sum(map(ord, text)) % 997), 0.5]


@dataclass
class FakeProvider:
    name: str
    cert_file: Path
    key_file: Path
    api_key: str | None = None
    host: str = "127.0.0.1"
    port: int = 0
    requests: list[RecordedRequest] = field(default_factory=list)
    reply: str | None = None  # the reply when a request names none (a judge model's YES or NO)
    delay_s: float = 0.0  # every answer waits this long (a model that never answers in time)
    api: str = "openai"  # openai, anthropic, gemini, bedrock or azure (extproc.demo.fake_apis)
    aws_access_key_id: str = ""  # bedrock: the key pair and region signatures are checked with
    aws_secret_access_key: str = field(default="", repr=False)
    aws_region: str = "us-east-1"
    azure_deployments: dict[str, str] = field(default_factory=dict)  # azure: deployment -> its model

    def start(self) -> FakeProvider:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_file, self.key_file)
        context.set_alpn_protocols(["http/1.1"])

        def remember_sni(sock, server_name, _ctx):
            sock.llm_sni = server_name

        context.sni_callback = remember_sni
        provider = self

        class Handler(_Handler):
            fake = provider

        self._server = _QuietServer((self.host, self.port), Handler)
        self._server.daemon_threads = True
        self._server.socket = context.wrap_socket(self._server.socket, server_side=True, do_handshake_on_connect=False)
        self.port = self._server.server_address[1]
        self._lock = threading.Lock()
        self._named: dict[str, int] = {}
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def clear(self) -> None:
        with self._lock:
            self.requests.clear()
            self._named.clear()

    def count_named(self, failure: str) -> int:
        """How many requests have asked this fake for `failure` so far (this one included)."""
        with self._lock:
            self._named[failure] = self._named.get(failure, 0) + 1
            return self._named[failure]


def _last_text(body: dict) -> str:
    """The text of a request's last message (its string, or its content parts' texts), or its prompt."""
    messages = body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        if isinstance(content, list):
            return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        return str(content or "")
    prompt = body.get("prompt")
    return prompt if isinstance(prompt, str) else ""


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        pass  # a client gone mid-answer (a timeout test) is not worth a traceback


class _Handler(BaseHTTPRequestHandler):
    fake: FakeProvider
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # keep the demo's terminal quiet
        pass

    def do_POST(self) -> None:
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        headers = {k.lower(): v for k, v in self.headers.items()}
        self.recorded = RecordedRequest("POST", self.path, headers, body, getattr(self.connection, "llm_sni", None))
        self.fake.record(self.recorded)
        failure = self._named_failure(headers.get("x-fake-fail", ""))
        if failure == "close":
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if failure.startswith("delay="):
            time.sleep(float(failure[len("delay="):]))
        elif failure.isdigit():
            headers["x-fake-status"] = failure
        elif failure.startswith("cut="):
            headers["x-fake-cut"] = failure[len("cut="):]

        if "x-fake-delay" in headers or self.fake.delay_s:
            time.sleep(float(headers.get("x-fake-delay", self.fake.delay_s)))
        if self.fake.api != "openai" and fake_apis.handle(self, headers, raw, body):
            return
        path = self.path.split("?", 1)[0]
        if self.fake.api == "openai" and self.fake.api_key \
                and headers.get("authorization") != f"Bearer {self.fake.api_key}":
            return self._error(401, "Incorrect API key provided", "invalid_api_key")
        if "x-fake-status" in headers:
            status = int(headers["x-fake-status"])
            return self._error(status, f"fake provider answered {status} as asked", "fake_error")
        if not isinstance(body, dict):
            return self._error(400, "body is not JSON", "invalid_json")
        if body.get("stream_options") is not None and body.get("stream") is not True:  # as OpenAI refuses it
            return self._error(400, "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                               "invalid_value")
        model = body.get("model", "")
        if self.fake.api == "azure":  # the deployment decides the model (the path's, checked by fake_apis)
            model = self.fake.azure_deployments.get(unquote(path.split("/")[3]), model)
        reply = headers.get("x-fake-reply") or self.fake.reply or f"Hello! I am {model}, served by {self.fake.name}."
        if headers.get("x-fake-echo") == "1":
            reply = _last_text(body) or reply
        usage: dict[str, Any] = {"prompt_tokens": prompt_tokens(body), "completion_tokens": count_tokens(reply)}
        usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
        if "x-fake-total-tokens" in headers:
            total = int(headers["x-fake-total-tokens"])
            usage = {"prompt_tokens": total // 2, "completion_tokens": total - total // 2, "total_tokens": total}
        if "x-fake-cached-tokens" in headers:
            usage["prompt_tokens_details"] = {"cached_tokens": int(headers["x-fake-cached-tokens"])}
        if path.endswith("/embeddings"):
            return self._embeddings(model, body)
        if body.get("stream") is True:
            return self._stream(model, reply, usage, body, headers)
        if path.endswith("/completions") and not path.endswith("/chat/completions"):
            answer = {"id": f"cmpl-{self.fake.name}-{len(self.fake.requests)}", "object": "text_completion",
                      "created": int(time.time()), "model": model, "usage": usage,
                      "choices": [{"index": 0, "text": reply, "logprobs": None, "finish_reason": "stop"}]}
            return self._send(200, json.dumps(answer).encode(), "application/json")
        message: dict[str, Any] = {"role": "assistant", "content": reply}
        tool = _tool(body, headers)
        if tool is not None:
            message["tool_calls"] = [tool]
        answer = {
            "id": f"chatcmpl-{self.fake.name}-{len(self.fake.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": message, "finish_reason": "tool_calls" if tool else "stop"}],
            "usage": usage,
        }
        self._send(200, json.dumps(answer).encode(), "application/json", float(headers.get("x-fake-body-delay", 0)))

    def _stream(self, model: str, reply: str, usage: dict, body: dict, headers: dict[str, str]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        delay = float(headers.get("x-fake-event-delay", 0))
        split = headers.get("x-fake-split") == "1"
        base = {"id": f"chatcmpl-{self.fake.name}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": model}
        events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": word + " "},
                                        "finish_reason": None}]}
                  for word in reply.split()]
        path = self.path.split("?", 1)[0]
        completion = not path.endswith("/chat/completions") and path.endswith("/completions")
        if completion:  # the legacy text completion's stream: `text` instead of `delta`
            base["object"] = "text_completion"
            events = [{**base, "choices": [{"index": 0, "text": word + " ", "logprobs": None, "finish_reason": None}]}
                      for word in reply.split()]
        if headers.get("x-fake-stream-error") == "1":
            failed: dict[str, object] = {"error": {"message": "the model failed mid-stream", "type": "server_error",
                                                   "code": None}}
            events = [*events[:1], failed]
        else:
            tool = None if completion else _tool(body, headers)
            if tool is not None:  # the call's id and name, then its arguments in two pieces
                arguments = tool["function"]["arguments"]
                events += [{**base, "choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                               {"index": 0, "id": tool["id"], "type": "function",
                                "function": {"name": tool["function"]["name"], "arguments": ""}}]}}]},
                           *({**base, "choices": [{"index": 0, "finish_reason": None, "delta": {"tool_calls": [
                               {"index": 0, "function": {"arguments": piece}}]}}]}
                             for piece in (arguments[:5], arguments[5:]))]
            events.append({**base, "choices": [{"index": 0, **({"text": ""} if completion else {"delta": {}}),
                                                "finish_reason": "tool_calls" if tool else "stop"}]})
            if (body.get("stream_options") or {}).get("include_usage"):
                events.append({**base, "choices": [], "usage": usage})
        payloads = [f"data: {json.dumps(event)}\n\n".encode() for event in events] + [b"data: [DONE]\n\n"]
        cut = int(headers["x-fake-cut"]) if "x-fake-cut" in headers else None
        for i, payload in enumerate(payloads):
            if cut is not None and i == cut:  # the connection dropped mid-stream
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if i and delay:
                time.sleep(delay)
            if split:
                half = len(payload) // 2
                self._chunk(payload[:half])
                time.sleep(0.05)
                self._chunk(payload[half:])
            else:
                self._chunk(payload)
            self.recorded.event_times.append(time.time())
        self._chunk(b"")

    def _embeddings(self, model: str, body: dict) -> None:
        texts = body.get("input")
        texts = texts if isinstance(texts, list) else [texts]
        as_base64 = body.get("encoding_format") == "base64"  # what the openai SDK asks for by default
        data = []
        for i, text in enumerate(texts):
            vector = fake_embedding(str(text))
            encoded = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
            data.append({"object": "embedding", "index": i, "embedding": encoded})
        tokens = prompt_tokens(body)
        answer = {"object": "list", "data": data, "model": model,
                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
        self._send(200, json.dumps(answer).encode(), "application/json")
    def _named_failure(self, spec: str) -> str:
        """This fake's part of an `x-fake-fail` header ("" when none, or not this time)."""
        for item in spec.split(","):
            name, _, failure = item.strip().partition(":")
            if name != self.fake.name or not failure:
                continue
            failure, _, every = failure.partition("/")
            if every and (self.fake.count_named(failure) - 1) % int(every):
                return ""
            return failure
        return ""

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    def _error(self, status: int, message: str, code: str) -> None:
        kind = "rate_limit_error" if status == 429 else ("invalid_request_error" if status < 500 else "server_error")
        body = json.dumps({"error": {"message": message, "type": kind, "code": code}}).encode()
        self._send(status, body, "application/json")

    def _send(self, status: int, payload: bytes, content_type: str, body_delay: float = 0) -> None:
        self.send_response(status)
        if status >= 400 and "x-fake-retry-after" in self.headers:
            self.send_header("retry-after", self.headers["x-fake-retry-after"])
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        if body_delay:
            quarter = len(payload) // 4 + 1
            for i in range(0, len(payload), quarter):
                if i:
                    time.sleep(body_delay)
                self.wfile.write(payload[i:i + quarter])
                self.wfile.flush()
            return
        self.wfile.write(payload)
