"""An OpenAI-compatible provider that streams paced answers to any number of clients at once:
asyncio, over TLS, HTTP/2 or HTTP/1.1 as ALPN picks (real providers offer both; HTTP/2 carries
thousands of streams over a few connections). For the tests and benches of many concurrent
streams (tests/e2e/test_concurrent_streams.py, `scripts/bench --concurrent-streams`,
the streaming benchmark's paced provider).

A chat completion (POST to a path ending in /chat/completions) with `"stream": true` is answered
with E server-sent events P ms apart, each stamped with the CLOCK_MONOTONIC time it was written
(`"sent_ns"`), then a usage event and `data: [DONE]`; E and P come from the request headers
`x-events` and `x-pace-ms` (defaults 20 and 500, or the server's own); with `x-hold-after: K` the
stream stops after K events until `POST /release` (so a test holds any number open at once, for
as long as it looks at them, and no longer). Without `"stream": true`
the answer is one JSON completion. As strict as the real API: without the right
`authorization: Bearer` key (when it has one) a 401, a body that is not JSON with `model` and
`messages` a 400, another path a 404, each as an OpenAI error.

`GET /stats` answers its counts as JSON: streams open now, the most open at once, streams
answered in full, requests refused; `POST /release` lets every held stream go on (and any held
later), `POST /hold` holds again.

Run in its own process: `python -m extproc.testing.stream_provider --cert C --key K --port P
[--api-key-env NAME] [--http1-only]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import ssl
import sys
import time
from dataclasses import dataclass, field

# python-hyper's HTTP/2 state machine: a test extra (pyproject), as only tests and benches run this
import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

DEFAULT_EVENTS = 20
DEFAULT_PACE_MS = 500
MAX_CONCURRENT_STREAMS = 256  # per HTTP/2 connection, as large providers' front ends advertise
WINDOW = 1 << 20

_EVENT = ('{{"sent_ns":{t},"id":"chatcmpl-paced","object":"chat.completion.chunk","model":"{model}",'
          '"choices":[{{"index":0,"delta":{{"content":"tok "}},"finish_reason":null}}]}}')


@dataclass
class Counts:
    open: int = 0
    peak: int = 0
    answered: int = 0
    refused: int = 0

    def opened(self) -> None:
        self.open += 1
        self.peak = max(self.peak, self.open)


@dataclass
class Answer:
    """What a request gets: an error or a JSON body (`body`), or a stream of `events` events."""

    status: int = 200
    body: bytes = b""
    events: int = 0
    pace_s: float = 0.0
    hold_after: int | None = None  # events sent before the stream waits for `POST /release`
    model: str = ""
    stream: bool = False
    content_type: str = "application/json"


@dataclass
class StreamProvider:
    api_key: str | None = None
    events: int = DEFAULT_EVENTS
    pace_ms: int = DEFAULT_PACE_MS
    counts: Counts = field(default_factory=Counts)
    released: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self, method: str, path: str, headers: dict[str, str], body: bytes) -> Answer:
        """The answer to one request, as the real API would give it."""
        if method == "GET" and path == "/stats":
            c = self.counts
            return Answer(body=json.dumps({"open": c.open, "peak": c.peak, "answered": c.answered,
                                           "refused": c.refused}).encode())
        if method == "POST" and path in ("/release", "/hold"):
            (self.released.set if path == "/release" else self.released.clear)()
            return Answer(body=b"{}")
        if method != "POST" or not path.split("?", 1)[0].endswith("/chat/completions"):
            return self._error(404, f"Invalid URL ({method} {path})", "unknown_url")
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return self._error(401, "Incorrect API key provided.", "invalid_api_key")
        try:
            request = json.loads(body)
        except ValueError:
            return self._error(400, "We could not parse the JSON body of your request.", "invalid_json")
        if not isinstance(request, dict) or not isinstance(request.get("messages"), list) or not request.get("model"):
            return self._error(400, "you must provide a model parameter and a messages array", "invalid_request")
        model = str(request["model"])
        if request.get("stream") is True:
            hold = headers.get("x-hold-after")
            return Answer(events=int(headers.get("x-events", self.events)), model=model, stream=True,
                          pace_s=int(headers.get("x-pace-ms", self.pace_ms)) / 1000, content_type="text/event-stream",
                          hold_after=int(hold) if hold is not None else None)
        return Answer(body=json.dumps({
            "id": "chatcmpl-paced", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "tok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}).encode())

    def _error(self, status: int, message: str, code: str) -> Answer:
        self.counts.refused += 1
        kind = "invalid_request_error"
        return Answer(status=status, body=json.dumps({"error": {"message": message, "type": kind, "param": None,
                                                                "code": code}}).encode())

    async def pace(self, i: int, answer: Answer) -> None:
        """Before event i: the pause since the last one, and the hold where the request asked for one."""
        if i and i == answer.hold_after:
            await self.released.wait()
        elif i:
            await asyncio.sleep(answer.pace_s)

    @staticmethod
    def event(i: int, answer: Answer) -> bytes:
        return b"data: " + _EVENT.format(t=time.monotonic_ns(), model=answer.model).encode() + b"\n\n"

    @staticmethod
    def tail(answer: Answer) -> bytes:
        return (b'data: {"id":"chatcmpl-paced","object":"chat.completion.chunk","model":"%s","choices":[],'
                b'"usage":{"prompt_tokens":5,"completion_tokens":%d,"total_tokens":%d}}\n\ndata: [DONE]\n\n'
                % (answer.model.encode(), answer.events, answer.events + 5))

    # --- HTTP/1.1 ---------------------------------------------------------------------------

    async def serve_http1(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].decode("latin-1").split(" ", 2)
            headers = {k.strip().lower().decode("latin-1"): v.strip().decode("latin-1")
                       for k, _, v in (line.partition(b":") for line in lines[1:] if line)}
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            answer = self.answer(method, path, headers, body)
            if not answer.stream:
                writer.write(b"HTTP/1.1 %d X\r\ncontent-type: %s\r\ncontent-length: %d\r\n\r\n%s"
                             % (answer.status, answer.content_type.encode(), len(answer.body), answer.body))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
            self.counts.opened()
            try:
                for i in range(answer.events):
                    await self.pace(i, answer)
                    data = self.event(i, answer)
                    writer.write(b"%x\r\n%s\r\n" % (len(data), data))
                    await writer.drain()
                tail = self.tail(answer)
                writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(tail), tail))
                await writer.drain()
                self.counts.answered += 1
            finally:
                self.counts.open -= 1

    # --- HTTP/2 -----------------------------------------------------------------------------

    async def serve_http2(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="latin-1"))
        # Envoy opens streams before it has our SETTINGS: until it acknowledges them, accept any
        # number rather than end the connection (h2 would enforce its own 100)
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: (1 << 31) - 1})
        conn.initiate_connection()
        conn.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                              h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW})
        conn.increment_flow_control_window(WINDOW)
        writer.write(conn.data_to_send())
        requests: dict[int, tuple[dict[str, str], bytearray]] = {}
        tasks: dict[int, asyncio.Task] = {}
        window = asyncio.Event()  # set when the peer opens a window

        async def send(sid: int, data: bytes, end: bool = False) -> None:
            while conn.local_flow_control_window(sid) < len(data):
                window.clear()
                await window.wait()
            conn.send_data(sid, data, end_stream=end)
            writer.write(conn.data_to_send())
            await writer.drain()

        async def respond(sid: int, headers: dict[str, str], body: bytes) -> None:
            answer = self.answer(headers.get(":method", ""), headers.get(":path", ""), headers, body)
            try:
                conn.send_headers(sid, [(":status", str(answer.status)), ("content-type", answer.content_type)],
                                  end_stream=False)
                if not answer.stream:
                    await send(sid, answer.body, end=True)
                    return
                self.counts.opened()
                try:
                    for i in range(answer.events):
                        await self.pace(i, answer)
                        await send(sid, self.event(i, answer))
                    await send(sid, self.tail(answer), end=True)
                    self.counts.answered += 1
                finally:
                    self.counts.open -= 1
            except (h2.exceptions.StreamClosedError, ConnectionError):
                pass  # the client reset this stream, or the connection is gone
            finally:
                tasks.pop(sid, None)

        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for event in conn.receive_data(data):
                    if isinstance(event, h2.events.RequestReceived):
                        requests[event.stream_id] = (dict(event.headers), bytearray())
                    elif isinstance(event, h2.events.DataReceived):
                        requests[event.stream_id][1].extend(event.data)
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, h2.events.StreamEnded):
                        headers, body = requests.pop(event.stream_id)
                        tasks[event.stream_id] = asyncio.create_task(respond(event.stream_id, headers, bytes(body)))
                    elif isinstance(event, h2.events.StreamReset):
                        requests.pop(event.stream_id, None)
                        task = tasks.pop(event.stream_id, None)
                        if task is not None:
                            task.cancel()
                    elif isinstance(event, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
                        window.set()
                    elif isinstance(event, h2.events.ConnectionTerminated):
                        return
                writer.write(conn.data_to_send())
        finally:
            for task in tasks.values():
                task.cancel()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        protocol = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        try:
            if protocol == "h2":
                await self.serve_http2(reader, writer)
            else:
                await self.serve_http1(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client went away
        except (asyncio.LimitOverrunError, ValueError, KeyError, h2.exceptions.ProtocolError) as exc:
            # a client that broke the protocol: its connection ends, said where tests see it
            print(f"stream provider: a connection ended: {exc!r}", file=sys.stderr, flush=True)
        finally:
            writer.close()


def call(port: int, path: str, ca_file: str, server_name: str, method: str = "POST") -> dict:
    """A test's or bench's word to a running provider (`/stats`, `/release`, `/hold`), over its TLS."""
    import http.client

    context = ssl.create_default_context(cafile=ca_file)
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10, context=context)
    conn.sock = context.wrap_socket(socket.create_connection(("127.0.0.1", port), 10), server_hostname=server_name)
    try:
        conn.request(method, path, body=b"" if method == "POST" else None)
        answer: dict = json.loads(conn.getresponse().read())
        return answer
    finally:
        conn.close()


def tls_context(cert: str, key: str, http1_only: bool = False) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"] if http1_only else ["h2", "http/1.1"])
    return context


def run(cert: str, key: str, port: int, host: str = "127.0.0.1", api_key: str | None = None,
        http1_only: bool = False) -> None:
    """Serve until killed."""
    provider = StreamProvider(api_key=api_key)

    async def main() -> None:
        server = await asyncio.start_server(provider.serve, host, port, ssl=tls_context(cert, key, http1_only),
                                            backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m extproc.testing.stream_provider", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--api-key-env", metavar="NAME", help="the API key clients must send, from this variable")
    parser.add_argument("--http1-only", action="store_true", help="offer HTTP/1.1 only (ALPN)")
    args = parser.parse_args(argv)
    api_key = os.environ[args.api_key_env] if args.api_key_env else None
    run(args.cert, args.key, args.port, args.host, api_key, args.http1_only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
