"""Answers given later (`extproc.dataplane.deferred`) on the lean HTTP/2 gRPC server: in order,
the stream's next messages (and the client's end) waiting behind them, past flow-control
windows, a failure as INTERNAL, and a stream reset or a connection lost meanwhile. Against a
real gRPC client (grpcio) and raw frames."""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
import hpack

from extproc.dataplane import grpc_h2 as h2
from extproc.dataplane.deferred import Deferred
from support.h2_frames import ended, frames_until, grpc_message, opening, request_headers

METHOD = "/test.Later/Chat"
LIMIT = 8 << 20
BIG = 3 << 20  # past the client's 64 KiB windows


class Later:
    """Answers each message reversed; b"wait" after 50 ms, b"big" (3 MiB) after 10 ms, b"fail"
    fails, b"now" is answered before the server takes it; b"end" ends the call. Every message
    handed over, answer given and close is written in `events`."""

    def __init__(self, events: list):
        self.events = events

    def on_message(self, message: bytes):
        self.events.append(("message", message))
        loop = asyncio.get_running_loop()
        if message in (b"wait", b"big", b"fail", b"now"):
            later = Deferred()
            if message == b"wait":
                loop.call_later(0.05, self._answer, later, message, message[::-1])
            elif message == b"big":
                loop.call_later(0.01, self._answer, later, message, b"b" * BIG)
            elif message == b"fail":
                loop.call_soon(later.fail, "the judge is gone")
            else:
                later.answer(b"won", False)
            return later, False
        return message[::-1], message == b"end"

    def _answer(self, later: Deferred, message: bytes, answer: bytes) -> None:
        self.events.append(("answered", message))
        later.answer(answer, False)

    def on_close(self):
        self.events.append(("closed",))


def serving(test, events: list):
    """Runs `test(port)` (a coroutine function) against a server of `Later` calls."""
    async def main():
        server = await h2.serve("127.0.0.1", 0, {METHOD: lambda identity: Later(events)}, LIMIT)
        try:
            return await test(server.sockets[0].getsockname()[1])
        finally:
            server.close()
    return asyncio.run(main())


def grpc_exchange(messages: list[bytes], **options) -> tuple[list[bytes], grpc.StatusCode, str, list]:
    """Sends every message at once (not waiting for answers), then ends: the answers, status, details."""
    events: list = []

    async def test(port):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=list(options.items())) as channel:
            stream = channel.stream_stream(METHOD, request_serializer=lambda b: b,
                                           response_deserializer=lambda b: b)(iter(messages))
            answers = [m async for m in stream]
            return answers, await stream.code(), await stream.details()

    try:
        return (*serving(test, events), events)
    except grpc.aio.AioRpcError as error:
        return [], error.code(), error.details() or "", events


def test_a_deferred_answer_comes_in_order_and_the_messages_behind_it_wait():
    answers, code, _, events = grpc_exchange([b"wait", b"abc", b"end"])
    assert answers == [b"tiaw", b"cba", b"dne"] and code == grpc.StatusCode.OK
    # b"abc" was handed to the call only after b"wait" was answered, though it came at once
    assert events == [("message", b"wait"), ("answered", b"wait"), ("message", b"abc"), ("message", b"end"),
                      ("closed",)]


def test_the_client_end_waits_for_the_deferred_answer():
    answers, code, _, events = grpc_exchange([b"one", b"wait"])  # the client half-closes right after
    assert answers == [b"eno", b"tiaw"] and code == grpc.StatusCode.OK
    assert events[-2:] == [("answered", b"wait"), ("closed",)]


def test_a_deferred_answer_larger_than_the_windows_arrives_whole():
    answers, code, _, _ = grpc_exchange([b"big", b"end"], **{"grpc.http2.bdp_probe": 0,
                                                           "grpc.max_receive_message_length": LIMIT})
    assert code == grpc.StatusCode.OK
    assert answers == [b"b" * BIG, b"dne"]


def test_a_deferred_failure_ends_the_call_with_internal_and_no_details_of_it():
    answers, code, details, events = grpc_exchange([b"fail", b"abc"])
    assert answers == [] and code == grpc.StatusCode.INTERNAL
    assert "judge" not in details and "Traceback" not in details
    assert ("message", b"abc") not in events and events[-1] == ("closed",)


def test_an_answer_given_before_the_server_took_it_is_sent_as_one_given_at_once():
    answers, code, _, _ = grpc_exchange([b"now", b"abc", b"end"])
    assert answers == [b"won", b"cba", b"dne"] and code == grpc.StatusCode.OK


def test_a_stream_reset_while_waiting_is_closed_and_its_late_answer_dropped():
    events: list = []

    async def test(port):
        def blocking():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(opening() + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, request_headers(METHOD))
                             + h2.frame(h2.DATA, 0, 1, grpc_message(b"wait") + grpc_message(b"abc"))
                             + h2.frame(h2.RST_STREAM, 0, 1, b"\0\0\0\x08"))
                time.sleep(0.15)  # after the late answer's time, another stream on the same connection
                sock.sendall(h2.frame(h2.HEADERS, h2.END_HEADERS, 3, request_headers(METHOD))
                             + h2.frame(h2.DATA, h2.END_STREAM, 3, grpc_message(b"xyz")))
                return frames_until(sock, ended(3))
        return await asyncio.to_thread(blocking)

    frames = serving(test, events)
    assert [f for f in frames if f[2] == 1] == []  # nothing ever written on the reset stream
    assert b"".join(f[3] for f in frames if f[0] == h2.DATA and f[2] == 3) == grpc_message(b"zyx")
    assert ("grpc-status", "0") in hpack.Decoder().decode(frames[-1][3])
    assert events[:3] == [("message", b"wait"), ("closed",), ("answered", b"wait")]  # closed once, at the reset
    assert ("message", b"abc") not in events  # what waited behind it is never handed over


def test_a_connection_lost_while_waiting_closes_the_call_and_the_server_serves_on():
    events: list = []

    async def test(port):
        def blocking():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(opening() + h2.frame(h2.HEADERS, h2.END_HEADERS, 1, request_headers(METHOD))
                             + h2.frame(h2.DATA, 0, 1, grpc_message(b"wait")))
                frames_until(sock, lambda fs: any(f[0] == h2.SETTINGS for f in fs))
        await asyncio.to_thread(blocking)  # closed before the answer
        await asyncio.sleep(0.1)  # the late answer comes to nobody
        return await asyncio.to_thread(grpc_exchange_on, port)

    answers = serving(test, events)
    assert answers == [b"cba", b"dne"]
    assert events[:3] == [("message", b"wait"), ("closed",), ("answered", b"wait")]


def grpc_exchange_on(port: int) -> list[bytes]:
    """A whole call on a new connection, from a thread (the server's loop runs on)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stream = channel.stream_stream(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
        return list(stream(iter([b"abc", b"end"]), timeout=5))
