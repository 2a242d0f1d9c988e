"""Many clients at once, each sending one request through the gateway and reading its whole
answer: asyncio over raw sockets (plain HTTP/1.1, one connection per client, as apps holding
many streams do), light enough for 10,000 in one process. For the tests and benches of
concurrent streams, with `extproc.testing.stream_provider` behind the gateway.

Each client keeps what a test checks (status, headers, the body of an answer that is not a
stream, the events of one that is, whether it ended with `data: [DONE]`) and, for the benches,
each event's delay from the provider's stamp (`"sent_ns"`) to its arrival.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_SENT = re.compile(rb'"sent_ns":(\d+),')
DONE = b"data: [DONE]"
CHAT_STREAM = json.dumps({"model": "any", "messages": [{"role": "user", "content": "Hi"}], "stream": True}).encode()


@dataclass
class StreamResult:
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""  # an answer that is not an event stream (an error), whole
    events: int = 0  # events stamped by the provider
    done: bool = False  # the stream ended with `data: [DONE]`
    error: str = ""  # the connection failed or ended before the answer did
    first_event_ns: int | None = None  # from sending the request to the first event

    @property
    def complete(self) -> bool:
        return self.status == 200 and self.done and not self.error

    def json(self) -> dict:
        parsed: dict = json.loads(self.body)
        return parsed


async def stream_request(port: int, host: str, body: bytes = CHAT_STREAM, headers: Sequence[tuple[str, str]] = (),
                         delays: list[int] | None = None, first_event: asyncio.Event | None = None,
                         timeout_s: float = 300, body_held: asyncio.Event | None = None,
                         head_sent: asyncio.Event | None = None) -> StreamResult:
    """One request to 127.0.0.1:`port` for `host`, its answer read to the end. With `body_held`,
    the body's last byte waits for that event (the gateway is still deciding the request; an
    answer that comes first, an early refusal, is read at once); `head_sent` is set when the
    rest has been sent."""
    result = StreamResult()
    writer = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
            sent = time.monotonic_ns()
            request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
                       f"connection: close\r\n{extra}content-length: {len(body)}\r\n\r\n".encode() + body)
            writer.write(request[:-1] if body_held is not None else request)
            if head_sent is not None:
                head_sent.set()
            if body_held is not None:
                answered = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                held = asyncio.ensure_future(body_held.wait())
                await asyncio.wait((answered, held), return_when=asyncio.FIRST_COMPLETED)
                held.cancel()
                if not answered.done():
                    writer.write(request[-1:])
                head = await answered
            else:
                head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            result.status = int(lines[0].split(" ", 2)[1])
            result.headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])
                              if k}
            streamed = result.headers.get("content-type", "").startswith("text/event-stream")
            carry = b""
            async for piece in _body(reader, result.headers):
                if not streamed:
                    result.body += piece
                    continue
                carry += piece
                now = time.monotonic_ns()
                last = 0
                for match in _SENT.finditer(carry):
                    result.events += 1
                    last = match.end()
                    if delays is not None:
                        delays.append(now - int(match.group(1)))
                    if result.first_event_ns is None:
                        result.first_event_ns = now - sent
                        if first_event is not None:
                            first_event.set()
                if DONE in carry:
                    result.done = True
                carry = carry[last:] if last else carry[-64:]
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, TimeoutError) as exc:
        result.error = repr(exc)
    finally:
        if writer is not None:
            writer.close()
    return result


async def _body(reader: asyncio.StreamReader, headers: dict[str, str]):
    """The answer's body as it arrives: chunked, of a content-length, or to the connection's end."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            yield await reader.readexactly(size)
            await reader.readexactly(2)
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while piece := await reader.read(65536):
            yield piece


async def many_streams(port: int, host: str, count: int, headers: Sequence[tuple[str, str]] = (),
                       body: bytes = CHAT_STREAM, delays: list[int] | None = None,
                       first_events: list[asyncio.Event] | None = None, timeout_s: float = 300) -> list[StreamResult]:
    """`count` clients at once; each one's result, in order."""
    return list(await asyncio.gather(*(
        stream_request(port, host, body, headers, delays, first_events[i] if first_events else None, timeout_s)
        for i in range(count))))
