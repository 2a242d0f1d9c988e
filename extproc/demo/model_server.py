"""A simulated model server (vLLM-like), for the tests, the demo and the endpoint-picking bench.

It behaves as a model server does, not as a web server: `slots` requests run at once, the rest
wait in a queue; the time to the first token grows with the prompt's length and shrinks when
the prompt's beginning is in its prefix cache (blocks of `PREFIX_CHARS` characters, chained, as
vLLM's automatic prefix caching keys its KV blocks); each output token takes `decode_s`; a LoRA
adapter (a model name other than the base model) is loaded on first use (`lora_load_s`), at most
`max_loras` at once. Its load is exported at `GET /metrics` in vLLM's names:
`vllm:num_requests_waiting`, `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (and the
old `vllm:gpu_cache_usage_perc`), `vllm:lora_requests_info`.

OpenAI's chat completions (`POST .../chat/completions`, JSON or server-sent events) and
completions are answered; each answer says which server gave it (`x-model-server` header and
`system_fingerprint`). Tests steer faults through attributes: `fail_status` (every completion
answered with it), `reset` (connections closed without an answer), `metrics_mode` ("ok", "slow",
"huge", "garbage", "absent"), `reported` (the load /metrics reports, replacing the real one).

Plain asyncio (HTTP/1.1, keep-alive), so hundreds of requests in flight cost little: the bench
runs four of them beside the gateway on one machine.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

PREFIX_CHARS = 256  # characters per prefix-cache block
EQUAL_LOAD = {"waiting": 0, "running": 0, "kv": 0.1}  # a `reported` load that ties with itself (tests)
CHARS_PER_TOKEN = 4


@dataclass
class ServerSpec:
    """How fast a simulated server is (seconds)."""

    slots: int = 4  # requests decoded at once
    prefill_base_s: float = 0.005
    prefill_per_token_s: float = 0.00005  # 1,000 uncached prompt tokens: 50 ms
    decode_s: float = 0.002  # per output token
    kv_capacity_tokens: int = 16_384
    cache_blocks: int = 2_048  # prefix-cache capacity, in blocks
    max_loras: int = 2
    lora_load_s: float = 0.05
    base_model: str = "base-model"


@dataclass
class Seen:
    model: str
    path: str
    headers: dict[str, str]
    prompt_chars: int
    cached_blocks: int


@dataclass
class ModelServer:
    name: str
    spec: ServerSpec = field(default_factory=ServerSpec)
    host: str = "127.0.0.1"
    port: int = 0
    # steering (tests)
    fail_status: int = 0
    reset: bool = False
    metrics_mode: str = "ok"
    reported: dict[str, float] | None = None
    # state
    seen: list[Seen] = field(default_factory=list)
    running: int = 0
    waiting: int = 0
    completed: int = 0
    metrics_scrapes: int = 0
    _kv_tokens: int = 0
    _cache: OrderedDict[int, None] = field(default_factory=OrderedDict)
    _loras: OrderedDict[str, None] = field(default_factory=OrderedDict)
    _free: asyncio.Semaphore | None = None
    _server: asyncio.AbstractServer | None = None
    _connections: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    async def start(self) -> ModelServer:
        self._free = asyncio.Semaphore(self.spec.slots)
        self._server = await asyncio.start_server(self._connection, self.host, self.port, limit=1 << 22)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._connections):
                writer.close()
            await self._server.wait_closed()
            self._server = None

    # ------------------------------------------------------------------ the model

    def _cached_blocks(self, prompt: str) -> tuple[int, list[int]]:
        """How many of the prompt's leading blocks are cached, and every full block's chained hash."""
        hashes, chained = [], 0
        for at in range(0, len(prompt) - PREFIX_CHARS + 1, PREFIX_CHARS):
            chained = hash((chained, prompt[at:at + PREFIX_CHARS]))
            hashes.append(chained)
        hits = 0
        for h in hashes:
            if h not in self._cache:
                break
            hits += 1
        return hits, hashes

    def _remember(self, hashes: list[int]) -> None:
        for h in hashes:
            self._cache[h] = None
            self._cache.move_to_end(h)
        while len(self._cache) > self.spec.cache_blocks:
            self._cache.popitem(last=False)

    async def _lora(self, model: str) -> None:
        if model == self.spec.base_model or model in self._loras:
            if model in self._loras:
                self._loras.move_to_end(model)
            return
        await asyncio.sleep(self.spec.lora_load_s)
        self._loras[model] = None
        while len(self._loras) > self.spec.max_loras:
            self._loras.popitem(last=False)

    def metrics_text(self) -> bytes:
        r = self.reported or {}
        waiting = r.get("waiting", self.waiting)
        running = r.get("running", self.running)
        kv = r.get("kv", min(1.0, self._kv_tokens / self.spec.kv_capacity_tokens))
        loras = ",".join(self._loras) if "loras" not in r else str(r["loras"])
        model = self.spec.base_model
        return (
            "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.\n"
            "# TYPE vllm:num_requests_waiting gauge\n"
            f'vllm:num_requests_waiting{{model_name="{model}"}} {float(waiting)}\n'
            "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
            "# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{model_name="{model}"}} {float(running)}\n'
            "# TYPE vllm:kv_cache_usage_perc gauge\n"
            f'vllm:kv_cache_usage_perc{{model_name="{model}"}} {float(kv)}\n'
            "# TYPE vllm:gpu_cache_usage_perc gauge\n"
            f'vllm:gpu_cache_usage_perc{{model_name="{model}"}} {float(kv)}\n'
            "# TYPE vllm:lora_requests_info gauge\n"
            f'vllm:lora_requests_info{{max_lora="{self.spec.max_loras}",running_lora_adapters="{loras}",'
            f'waiting_lora_adapters=""}} {time.time()}\n'
            "# TYPE vllm:prompt_tokens_total counter\n"
            f'vllm:prompt_tokens_total{{model_name="{model}"}} 0.0\n'
        ).encode()

    # ------------------------------------------------------------------ HTTP

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                    return
                request_line, *lines = head.decode("latin-1").split("\r\n")
                method, path, _ = (request_line.split(" ") + ["", ""])[:3]
                headers = {}
                for line in lines:
                    if ":" in line:
                        k, _, v = line.partition(":")
                        headers[k.strip().lower()] = v.strip()
                length = int(headers.get("content-length") or 0)
                body = await reader.readexactly(length) if length else b""
                if method == "GET" and path.startswith("/metrics"):
                    if not await self._metrics(writer):
                        return
                    continue
                if self.reset:
                    writer.transport.abort()
                    return
                await self._complete(path, headers, body, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _metrics(self, writer: asyncio.StreamWriter) -> bool:
        self.metrics_scrapes += 1
        mode = self.metrics_mode
        if mode == "absent":
            _respond(writer, 404, b"not found", "text/plain")
            return True
        if mode == "slow":
            await asyncio.sleep(5)
        if mode == "garbage":
            body = b"\x00\xffnot metrics {{{ at all\n" * 100
        elif mode == "huge":
            body = b"# padding " + b"x" * (8 << 20) + b"\n" + self.metrics_text()
        else:
            body = self.metrics_text()
        _respond(writer, 200, body, "text/plain; version=0.0.4")
        await writer.drain()
        return True

    async def _complete(self, path: str, headers: dict[str, str], body: bytes,
                        writer: asyncio.StreamWriter) -> None:
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            _respond(writer, 400, _error("body is not JSON"), "application/json")
            return
        model = str(data.get("model") or "")
        if "messages" in data:
            prompt = "".join(str(m.get("content", "")) for m in data.get("messages") or [] if isinstance(m, dict))
        else:
            prompt = str(data.get("prompt", ""))
        if self.fail_status:
            self.seen.append(Seen(model, path, headers, len(prompt), 0))
            _respond(writer, self.fail_status, _error(f"{self.name} fails on purpose"), "application/json",
                     {"x-model-server": self.name})
            return
        assert self._free is not None
        output_tokens = int(data.get("max_tokens") or data.get("max_completion_tokens") or 16)
        prompt_tokens = max(1, len(prompt) // CHARS_PER_TOKEN)
        self.waiting += 1
        async with self._free:
            self.waiting -= 1
            self.running += 1
            hits, hashes = self._cached_blocks(prompt)
            self.seen.append(Seen(model, path, headers, len(prompt), hits))
            reserved = prompt_tokens + output_tokens
            self._kv_tokens += reserved
            try:
                await self._lora(model)
                uncached = max(0, prompt_tokens - hits * PREFIX_CHARS // CHARS_PER_TOKEN)
                await asyncio.sleep(self.spec.prefill_base_s + self.spec.prefill_per_token_s * uncached)
                self._remember(hashes)
                if data.get("stream"):
                    await self._stream(writer, model, prompt_tokens, output_tokens, hits)
                else:
                    await asyncio.sleep(self.spec.decode_s * output_tokens)
                    _respond(writer, 200, json.dumps(self._answer(model, prompt_tokens, output_tokens, hits)).encode(),
                             "application/json", {"x-model-server": self.name})
            finally:
                self._kv_tokens -= reserved
                self.running -= 1
                self.completed += 1

    def _answer(self, model: str, prompt_tokens: int, output_tokens: int, hits: int) -> dict[str, Any]:
        return {"id": f"chatcmpl-{self.name}-{self.completed}", "object": "chat.completion",
                "created": int(time.time()), "model": model, "system_fingerprint": self.name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": f"served by {self.name}"},
                             "finish_reason": "stop"}],
                "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": output_tokens,
                          "total_tokens": prompt_tokens + output_tokens,
                          "prompt_tokens_details": {"cached_tokens": hits * PREFIX_CHARS // CHARS_PER_TOKEN}}}

    async def _stream(self, writer: asyncio.StreamWriter, model: str, prompt_tokens: int, output_tokens: int,
                      hits: int) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
                     + f"x-model-server: {self.name}\r\n\r\n".encode())

        def event(payload: dict[str, Any] | str) -> None:
            text = payload if isinstance(payload, str) else json.dumps(payload)
            data = f"data: {text}\n\n".encode()
            writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

        base = {"id": f"chatcmpl-{self.name}-{self.completed}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": self.name}
        event({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "served"},
                                    "finish_reason": None}]})
        await writer.drain()
        await asyncio.sleep(self.spec.decode_s * output_tokens)
        event({**base, "choices": [{"index": 0, "delta": {"content": f" by {self.name}"}, "finish_reason": "stop"}]})
        event({**base, "choices": [], "usage": self._answer(model, prompt_tokens, output_tokens, hits)["usage"]})
        event("[DONE]")
        writer.write(b"0\r\n\r\n")
        await writer.drain()


def _error(message: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": "server_error", "code": "simulated"}}).encode()


def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, content_type: str,
             headers: dict[str, str] | None = None) -> None:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\ncontent-type: {content_type}\r\n"
                 f"content-length: {len(body)}\r\n{extra}\r\n".encode() + body)


class ModelServerFarm:
    """Simulated model servers on a loop of their own thread (tests): each on its own loopback
    address (127.0.0.11, .12, ...) and a free port."""

    def __init__(self, count: int, spec: ServerSpec | None = None, first_ip: int = 11, port: int = 0):
        """`port`: one port for all (as pods of one pool share their target port); 0: each a free one."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="model-servers", daemon=True)
        self._thread.start()
        self.servers = [ModelServer(f"ms{i}", spec or ServerSpec(), host=f"127.0.0.{first_ip + i}", port=port)
                        for i in range(count)]
        for server in self.servers:
            self.call(server.start())

    def call(self, coroutine: Any, timeout: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def stop_server(self, server: ModelServer) -> None:
        """Gone: its port refuses connections."""
        self.call(server.stop())

    def stop(self) -> None:
        for server in self.servers:
            self.call(server.stop())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> ModelServerFarm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
