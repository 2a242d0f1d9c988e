"""The lean HTTP/2 gRPC server, against a real gRPC client (grpcio) and against raw frames."""

from __future__ import annotations

import asyncio
import socket
import struct

import grpc
import hpack
import pytest

from extproc.dataplane import grpc_h2 as h2

METHOD = "/test.Echo/Chat"
LIMIT = 8 << 20


class Echo:
    """Answers each message with itself reversed; b"end" ends the call, b"boom" is a bug."""

    def on_message(self, message: bytes) -> tuple[bytes | None, bool]:
        if message == b"boom":
            raise RuntimeError("a bug in a handler")
        if message == b"quiet":
            return None, False
        return message[::-1], message == b"end"


async def with_server(test):
    server = await h2.serve("127.0.0.1", 0, {METHOD: lambda identity: Echo()}, LIMIT)
    port = server.sockets[0].getsockname()[1]
    try:
        return await test(port)
    finally:
        server.close()


def call(channel: grpc.aio.Channel, method: str = METHOD):
    return channel.stream_stream(method, request_serializer=lambda b: b, response_deserializer=lambda b: b)


def run_with_channel(test, **options):
    async def main(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(options.items())) as channel:
            return await test(channel)
    return asyncio.run(with_server(main))


async def exchange(channel, messages: list[bytes], method: str = METHOD):
    stream = call(channel, method)(iter(messages))
    answers = []
    try:
        async for message in stream:
            answers.append(message)
    except grpc.aio.AioRpcError as error:
        return answers, error.code()
    return answers, await stream.code()


def test_messages_answered_in_order_and_the_call_ended_by_the_handler():
    """The client never half-closes: the handler's answer to b"end" ends the call with OK. (What a
    client writes after the end is checked on raw frames below: grpcio's client fails a write that
    races the server's trailers with its own INTERNAL error.)"""
    async def test(channel):
        stream = call(channel)()
        answers = []
        for message in (b"abc", b"xyz", b"end"):
            await stream.write(message)
            answers.append(await stream.read())
        return answers, await stream.read(), await stream.code()

    answers, after_the_end, code = run_with_channel(test)
    assert answers == [b"cba", b"zyx", b"dne"]
    assert after_the_end is grpc.aio.EOF
    assert code == grpc.StatusCode.OK


def test_client_half_close_ends_the_call_with_ok():
    answers, code = run_with_channel(lambda ch: exchange(ch, [b"one", b"quiet"]))
    assert answers == [b"eno"] and code == grpc.StatusCode.OK


@pytest.mark.parametrize("size", [0, 1, 16_384, 65_535, 65_536, 3 << 20])
def test_sizes_across_frames_and_flow_control_windows(size):
    """The client's 64 KiB windows make the server wait for WINDOW_UPDATEs on big answers."""
    payload = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    answers, code = run_with_channel(lambda ch: exchange(ch, [payload, b"end"]),
                                     **{"grpc.http2.bdp_probe": 0, "grpc.max_receive_message_length": LIMIT})
    assert code == grpc.StatusCode.OK
    assert answers[0] == payload[::-1] and len(answers) == 2


def test_many_concurrent_streams_on_one_connection():
    async def test(channel):
        results = await asyncio.gather(*(exchange(channel, [f"m{i}".encode(), b"end"]) for i in range(300)))
        return results

    results = run_with_channel(test)
    assert [answers[0] for answers, _ in results] == [f"m{i}".encode()[::-1] for i in range(300)]
    assert {code for _, code in results} == {grpc.StatusCode.OK}


@pytest.mark.parametrize(("method", "messages", "expected"), [
    pytest.param("/test.Echo/Other", [], grpc.StatusCode.UNIMPLEMENTED, id="unknown-method"),
    pytest.param(METHOD, [b"boom"], grpc.StatusCode.INTERNAL, id="handler-bug"),
    pytest.param(METHOD, [b"ok", b"boom"], grpc.StatusCode.INTERNAL, id="handler-bug-after-an-answer"),
    pytest.param(METHOD, [b"x" * (LIMIT + 1)], grpc.StatusCode.RESOURCE_EXHAUSTED, id="message-over-the-limit"),
])
def test_errors_end_the_call_with_a_status(method, messages, expected):
    """Each message is written only after the one before it was answered, and the client does
    not half-close: grpcio's client reports its own INTERNAL error when the server ends a call
    while the client is still writing."""
    async def test(channel):
        stream = call(channel, method)()
        for message in messages:
            await stream.write(message)
            if message != messages[-1]:
                await stream.read()
        return await stream.code(), await stream.details()

    code, details = run_with_channel(test, **{"grpc.max_send_message_length": 2 * LIMIT})
    assert code == expected, details
    assert "Traceback" not in details and "RuntimeError" not in details


def test_server_survives_a_client_that_cancels():
    async def test(channel):
        stream = call(channel)()
        await stream.write(b"first")
        assert await stream.read() == b"tsrif"
        stream.cancel()
        return await exchange(channel, [b"after", b"end"])

    answers, code = run_with_channel(test)
    assert answers[0] == b"retfa" and code == grpc.StatusCode.OK


# Raw frames: what a gRPC client library rarely sends but a peer may.

def frames_until(sock: socket.socket, wanted, limit: int = 50) -> list[tuple[int, int, int, bytes]]:
    """Reads frames until `wanted(frames)` is true."""
    buf, frames = b"", []
    while not wanted(frames) and len(frames) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            break
        buf += chunk
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF, buf[9:9 + length]))
            buf = buf[9 + length:]
    return frames


def raw_session(script) -> list[tuple[int, int, int, bytes]]:
    async def main(port):
        def blocking():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                return script(sock)
        return await asyncio.to_thread(blocking)
    return asyncio.run(with_server(main))


def request_headers(method: str = METHOD) -> bytes:
    return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", method),
                                   (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])


def grpc_message(data: bytes) -> bytes:
    return struct.pack(">BI", 0, len(data)) + data


def test_ping_is_answered_and_settings_acknowledged():
    def script(sock):
        sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0) + h2.frame(h2.PING, 0, 0, b"12345678"))
        return frames_until(sock, lambda fs: any(f[0] == h2.PING for f in fs) and
                            any(f[0] == h2.SETTINGS and f[1] & h2.ACK for f in fs))

    frames = raw_session(script)
    assert (h2.PING, h2.ACK, 0, b"12345678") in frames
    settings = next(f for f in frames if f[0] == h2.SETTINGS and not f[1] & h2.ACK)[3]
    values = dict(struct.unpack_from(">HI", settings, i) for i in range(0, len(settings), 6))
    assert values[h2.SETTINGS_HEADER_TABLE_SIZE] == 0  # no dynamic table: header blocks can be recognised


def test_continuation_and_padding_are_understood():
    def script(sock):
        block = request_headers()
        padded = bytes([3]) + grpc_message(b"hello") + b"\0\0\0"
        sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
                     + h2.frame(h2.HEADERS, 0, 1, block[:5]) + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, block[5:])
                     + h2.frame(h2.DATA, h2.PADDED, 1, padded)
                     + h2.frame(h2.DATA, h2.END_STREAM, 1, grpc_message(b"end")))
        return frames_until(sock, lambda fs: any(f[0] == h2.HEADERS and f[1] & h2.END_STREAM for f in fs))

    frames = [f for f in raw_session(script) if f[2] == 1]
    data = b"".join(f[3] for f in frames if f[0] == h2.DATA)
    assert data == grpc_message(b"olleh") + grpc_message(b"dne")
    trailers = hpack.Decoder().decode(frames[-1][3])
    assert ("grpc-status", "0") in trailers


def test_messages_after_the_handler_ended_the_call_are_never_answered():
    def script(sock):
        sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
                     + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, request_headers())
                     + h2.frame(h2.DATA, 0, 1,
                                grpc_message(b"abc") + grpc_message(b"end") + grpc_message(b"never read")))
        frames = frames_until(sock, lambda fs: any(f[0] == h2.HEADERS and f[1] & h2.END_STREAM for f in fs))
        sock.sendall(h2.frame(h2.DATA, h2.END_STREAM, 1, grpc_message(b"late")) + h2.frame(h2.PING, 0, 0, b"87654321"))
        return frames + frames_until(sock, lambda fs: any(f[0] == h2.PING for f in fs))

    frames = raw_session(script)
    on_the_stream = [f for f in frames if f[2] == 1]
    assert b"".join(f[3] for f in on_the_stream if f[0] == h2.DATA) == grpc_message(b"cba") + grpc_message(b"dne")
    assert ("grpc-status", "0") in hpack.Decoder().decode(on_the_stream[-1][3])
    assert on_the_stream[-1][1] & h2.END_STREAM  # nothing on the stream after its trailers
    assert (h2.PING, h2.ACK, 0, b"87654321") in frames  # the connection still serves


class Several:
    """Answers a message with three (the ext_proc answers a whole request at once this way)."""

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        return [message, message.upper(), b""], True


def test_several_answers_to_one_message_go_in_one_data_frame():
    async def main():
        def blocking():
            with socket.create_connection(("127.0.0.1", server.sockets[0].getsockname()[1]), timeout=5) as sock:
                sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
                             + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, request_headers("/test.Several/Call"))
                             + h2.frame(h2.DATA, 0, 1, grpc_message(b"abc")))
                return frames_until(sock, lambda fs: any(f[0] == h2.HEADERS and f[1] & h2.END_STREAM for f in fs))
        server = await h2.serve("127.0.0.1", 0, {"/test.Several/Call": lambda identity: Several()}, LIMIT)
        try:
            return await asyncio.to_thread(blocking)
        finally:
            server.close()

    data = [f for f in asyncio.run(main()) if f[0] == h2.DATA and f[2] == 1]
    assert [f[3] for f in data] == [grpc_message(b"abc") + grpc_message(b"ABC") + grpc_message(b"")]


def test_not_http2_is_refused_with_goaway():
    def script(sock):
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return frames_until(sock, lambda fs: any(f[0] == h2.GOAWAY for f in fs))

    frames = raw_session(script)
    goaway = next(f for f in frames if f[0] == h2.GOAWAY)
    assert int.from_bytes(goaway[3][4:8], "big") == h2.PROTOCOL_ERROR


def test_a_stream_reset_by_the_client_gives_back_what_it_held():
    closed = []

    class Holder:
        def on_message(self, message):
            return None, False

        def on_close(self):
            closed.append(1)

    async def main():
        server = await h2.serve("127.0.0.1", 0, {"/test.Echo/Chat": lambda identity: Holder()}, 1 << 20)
        port = server.sockets[0].getsockname()[1]

        def script():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
                             + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, request_headers())
                             + h2.frame(h2.DATA, 0, 1, grpc_message(b"body"))
                             + h2.frame(h2.RST_STREAM, 0, 1, b"\0\0\0\x08") + h2.frame(h2.PING, 0, 0, b"12345678"))
                frames_until(sock, lambda fs: any(f[0] == h2.PING for f in fs))
        try:
            await asyncio.to_thread(script)
        finally:
            server.close()

    asyncio.run(main())
    assert closed == [1]
