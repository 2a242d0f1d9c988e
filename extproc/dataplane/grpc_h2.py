"""A lean HTTP/2 gRPC server for the ext_proc's hot path.

Envoy opens one ext_proc stream per request and sends two small messages on it. grpcio's
asyncio server spends most of a request's CPU in its own machinery (a task per stream, a
thread hop per message), which capped the gateway near 1,500 requests/s on two cores. This
server runs each message straight from the socket callback: frames are parsed, a message is
answered by a synchronous handler, and everything the callback produced leaves in one write.

It speaks only what Envoy's gRPC client needs (RFC 9113, gRPC over HTTP/2): streams, flow
control both ways, SETTINGS, PING, RST_STREAM, GOAWAY, CONTINUATION, padding. It asks Envoy
for no HPACK dynamic table, so a request's header block is decoded once and then recognised
by its bytes. Uncompressed messages only (Envoy sends none compressed unless told to).

With an authenticator (TCP), a stream is opened only for a caller whose `authorization` header
proves who it is (see `extproc.dataplane.authentication`); the call's factory gets that identity. A token seen
before is a cache hit; a new one pauses the connection until it is verified, off the loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable
from typing import Protocol

import hpack

from ..policy.caller import LOCAL, Caller
from ..protocol import HEALTH_CHECK
from .authentication import PENDING, Authenticator, bearer
from .deferred import Answers, Deferred

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, FRAME_SIZE_ERROR = 0x0, 0x1, 0x2, 0x3, 0x6
# the payload sizes RFC 9113 fixes, by frame type
_FIXED_SIZES = {PRIORITY: 5, RST_STREAM: 4, PING: 8, WINDOW_UPDATE: 4}
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x1, 0x4, 0x5

MAX_WINDOW = (1 << 31) - 1
DEFAULT_WINDOW = 65535
OUR_MAX_FRAME = (1 << 24) - 1
REPLENISH_AT = 1 << 30  # received bytes after which a window is topped up again

_FRAME_HEAD = struct.Struct(">BHBBI")  # length (24 bits as 8 + 16), type, flags, stream id
_MESSAGE_HEAD = struct.Struct(">BI")  # gRPC: compressed flag, length
_U32 = struct.Struct(">I")


def frame(ftype: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    n = len(payload)
    return _FRAME_HEAD.pack(n >> 16, n & 0xFFFF, ftype, flags, stream_id) + payload


def _literal(name: bytes, value: bytes) -> bytes:
    """An HPACK literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2);
    names and values here are under 127 bytes."""
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


# `:status: 200` is static entry 8; `content-type` is static entry 31 (literal, indexed name).
RESPONSE_HEADERS = b"\x88" + b"\x0f\x10" + bytes([len(b"application/grpc")]) + b"application/grpc"
TRAILERS_OK = _literal(b"grpc-status", b"0")


def trailers(status: int, message: str) -> bytes:
    text = message.encode("ascii", "replace")[:100].replace(b"%", b"%25")
    return _literal(b"grpc-status", str(status).encode()) + _literal(b"grpc-message", text)


UNIMPLEMENTED, INTERNAL, RESOURCE_EXHAUSTED, UNAUTHENTICATED = 12, 13, 8, 16
# Envoy's active health checks carry no credentials (they bypass the cluster's upstream filters) and
# learn nothing secret: serving or not.
UNAUTHENTICATED_METHODS = frozenset({HEALTH_CHECK})


class Call(Protocol):
    """One gRPC call: each request message in, the response messages it completes out (none,
    one, or a list), and whether the call is over (the server then sends OK trailers). A call
    that must wait before it answers returns a `Deferred` (`extproc.dataplane.deferred`) in place
    of its answers and answers through it later; its stream's next messages wait until then. A
    call may also define `on_client_end() -> bytes | None`: the last message, once the client has
    sent everything."""

    def on_message(self, message: bytes) -> tuple[Answers | Deferred, bool]: ...


class _Stream:
    __slots__ = ("call", "buffer", "headers_sent", "send_window", "pending", "received", "closed", "waiting",
                 "client_done")

    def __init__(self, call: Call, send_window: int):
        self.call = call
        self.buffer = bytearray()
        self.headers_sent = False
        self.send_window = send_window
        self.pending: list[bytes] = []  # gRPC-framed response bytes waiting for window
        self.received = 0
        self.closed = False  # our side has ended (trailers queued or sent)
        self.waiting: Deferred | None = None  # an answer to come: the next messages wait in `buffer`
        self.client_done = False  # the client ended its side while an answer was to come


class H2Connection(asyncio.Protocol):
    """One Envoy connection. `methods` maps a gRPC path to a factory of calls, given the caller."""

    def __init__(self, methods: dict[str, Callable[[Caller | None], Call]], max_message: int,
                 authenticator: Authenticator | None = None, registry: set | None = None, local: Caller = LOCAL):
        self._registry = registry  # the server's open connections, for a graceful drain
        self._methods = methods
        self._authenticator = authenticator
        self._local = local  # the caller without an authenticator (a Unix socket): as the operator states it
        self._verifying = False  # a token is being verified: frames wait in the buffer
        self._fresh: tuple[str, Caller | None] | None = None  # a token just verified, and its caller
        self._max_message = max_message
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._preface_seen = False
        self._out: list[bytes] = []
        self._streams: dict[int, _Stream] = {}
        self._last_stream = 0
        self._peer_window = DEFAULT_WINDOW  # what the peer's connection window lets us send
        self._peer_initial = DEFAULT_WINDOW
        self._peer_max_frame = 16384
        self._received = 0
        self._decoder = hpack.Decoder()
        self._paths: dict[bytes, tuple[str | None, str | None]] = {}  # header block -> :path, bearer token
        self._continuing: tuple[int, int, bytearray] | None = None  # stream id, flags, block

    # asyncio.Protocol

    def connection_made(self, transport) -> None:
        self._transport = transport
        if self._registry is not None:
            self._registry.add(self)
        settings = b"".join(struct.pack(">HI", k, v) for k, v in (
            (SETTINGS_HEADER_TABLE_SIZE, 0), (SETTINGS_INITIAL_WINDOW_SIZE, MAX_WINDOW),
            (SETTINGS_MAX_FRAME_SIZE, OUR_MAX_FRAME)))
        transport.write(frame(SETTINGS, 0, 0, settings) +
                        frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - DEFAULT_WINDOW)))

    def connection_lost(self, exc) -> None:
        for stream in self._streams.values():
            if not stream.closed:
                _closed(stream.call)
        self._streams.clear()
        self._transport = None
        if self._registry is not None:
            self._registry.discard(self)

    # draining

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def go_away(self) -> None:
        """Graceful shutdown (RFC 9113 6.8): the client opens no new stream here; streams
        already open, and any that crossed this on the wire, are still served."""
        if self._transport is not None:
            self._transport.write(frame(GOAWAY, 0, 0, _U32.pack(MAX_WINDOW) + _U32.pack(NO_ERROR)))

    def data_received(self, data: bytes) -> None:
        if self._transport is None:
            return  # closed by us: what was still on its way is dropped
        buf = self._buffer
        buf += data
        if self._verifying:
            return
        pos = 0
        if not self._preface_seen:
            seen = min(len(buf), len(PREFACE))
            if buf[:seen] != PREFACE[:seen]:
                self._close(PROTOCOL_ERROR, "not an HTTP/2 client")
                return
            if seen < len(PREFACE):
                return
            self._preface_seen = True
            pos = len(PREFACE)
        try:
            end = len(buf)
            while end - pos >= 9:
                hi, lo, ftype, flags, sid = _FRAME_HEAD.unpack_from(buf, pos)
                length = (hi << 16) | lo
                if length > OUR_MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, "frame too large")
                if end - pos - 9 < length:
                    break
                payload = bytes(buf[pos + 9:pos + 9 + length])
                continuing = self._continuing
                continued = len(continuing[2]) if continuing is not None else 0
                try:
                    self._on_frame(ftype, flags, sid & 0x7FFFFFFF, payload)
                except _Unverified as pending:  # this frame again once the token is known
                    if continuing is not None:
                        del continuing[2][continued:]
                    self._continuing = continuing
                    del buf[:pos]
                    self._flush()
                    self._verify(pending.token)
                    return
                pos += 9 + length
        except _ConnectionError as exc:
            self._close(exc.code, str(exc))
            return
        except Exception:  # a bug here must cost one connection, never the process's event loop
            log.exception("HTTP/2 connection failed")
            self._close(INTERNAL_ERROR, "internal error")
            return
        del buf[:pos]
        self._flush()

    # frames

    def _on_frame(self, ftype: int, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is not None and ftype != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "header block interrupted")
        size = _FIXED_SIZES.get(ftype)
        if size is not None and len(payload) != size:
            raise _ConnectionError(FRAME_SIZE_ERROR, f"frame of type {ftype} with {len(payload)} bytes")
        if ftype == DATA:
            self._on_data(flags, sid, payload)
        elif ftype == HEADERS:
            self._on_headers(flags, sid, payload)
        elif ftype == CONTINUATION:
            self._on_continuation(flags, sid, payload)
        elif ftype == RST_STREAM:
            if (reset := self._streams.pop(sid, None)) is not None and not reset.closed:
                _closed(reset.call)
        elif ftype == SETTINGS:
            if not flags & ACK:
                self._on_settings(payload)
        elif ftype == WINDOW_UPDATE:
            self._on_window_update(sid, payload)
        elif ftype == PING:
            if not flags & ACK:
                self._out.append(frame(PING, ACK, 0, payload))
        elif ftype == GOAWAY or ftype == PRIORITY:
            pass  # Envoy drains and closes by itself; priorities do not matter here
        elif ftype == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client cannot push")
        # unknown frame types are ignored (RFC 9113 5.5)

    def _on_data(self, flags: int, sid: int, payload: bytes) -> None:
        self._received += len(payload)
        if self._received >= REPLENISH_AT:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._received)))
            self._received = 0
        stream = self._streams.get(sid)
        if stream is None or stream.closed:
            return  # a stream we already ended or reset: its data only counts for the window
        stream.received += len(payload)
        if flags & PADDED:
            payload = _unpad(payload)
        if stream.received >= REPLENISH_AT:
            self._out.append(frame(WINDOW_UPDATE, 0, sid, _U32.pack(stream.received)))
            stream.received = 0
        stream.buffer += payload
        self._read_messages(sid, stream)
        if flags & END_STREAM:
            self._client_ended(sid)

    def _on_headers(self, flags: int, sid: int, payload: bytes) -> None:
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            payload = payload[5:]
        if not flags & END_HEADERS:
            self._continuing = (sid, flags, bytearray(payload))
            return
        self._header_block(flags, sid, payload)

    def _on_continuation(self, flags: int, sid: int, payload: bytes) -> None:
        if self._continuing is None or self._continuing[0] != sid:
            raise _ConnectionError(PROTOCOL_ERROR, "unexpected CONTINUATION")
        self._continuing[2].extend(payload)
        if flags & END_HEADERS:
            _, first_flags, block = self._continuing
            self._continuing = None
            self._header_block(first_flags, sid, bytes(block))

    def _header_block(self, flags: int, sid: int, block: bytes) -> None:
        path, token = self._path(block)
        if sid in self._streams or sid <= self._last_stream:
            if flags & END_STREAM:  # trailers from the client: it has nothing more to send
                self._client_ended(sid)
            return
        if sid % 2 == 0:
            raise _ConnectionError(PROTOCOL_ERROR, "even stream id from a client")
        identity: Caller | None = self._local
        if self._authenticator is not None:
            cached = self._authenticator.cached(token)
            if cached is PENDING:
                fresh = self._fresh
                if fresh is None or fresh[0] != token:
                    raise _Unverified(token or "")
                cached = fresh[1]
            identity = cached
        self._last_stream = sid
        if identity is None and path not in UNAUTHENTICATED_METHODS:
            self._out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, RESPONSE_HEADERS + trailers(
                UNAUTHENTICATED, "a valid bearer token is required" if token else "a bearer token is required")))
            return
        factory = self._methods.get(path or "")
        if factory is None:
            self._out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid,
                                   RESPONSE_HEADERS + trailers(UNIMPLEMENTED, f"unknown method {path}")))
            return
        self._streams[sid] = _Stream(factory(identity), self._peer_initial)
        if flags & END_STREAM:
            self._client_ended(sid)

    def _path(self, block: bytes) -> tuple[str | None, str | None]:
        """The block's :path and bearer token."""
        found = self._paths.get(block)
        if found is not None:
            return found
        try:
            headers = self._decoder.decode(block, raw=True)
        except hpack.HPACKError as exc:
            raise _ConnectionError(0x9, f"bad header block: {exc}") from None  # COMPRESSION_ERROR
        path = next((v.decode("latin-1") for k, v in headers if k == b":path"), None)
        token = bearer(next((v.decode("latin-1") for k, v in headers if k == b"authorization"), None))
        # a method may also be served apart for one authority (methods keyed "authority/path")
        authority = next((v.decode("latin-1") for k, v in headers if k == b":authority"), "")
        if path is not None and authority + path in self._methods:
            path = authority + path
        if len(self._decoder.header_table.dynamic_entries) == 0 and len(self._paths) < 64:
            self._paths[block] = (path, token)  # decoding it again could not give anything else
        return path, token

    def _verify(self, token: str) -> None:
        """Stops reading until the token is verified, then goes on with the frames held back."""
        assert self._authenticator is not None and self._transport is not None
        self._verifying = True
        self._transport.pause_reading()
        task = asyncio.get_running_loop().create_task(self._authenticator.verify(token))
        task.add_done_callback(self._verified)

    def _verified(self, task: asyncio.Task) -> None:
        self._verifying = False
        if task.cancelled() or self._transport is None:
            return
        if task.exception() is not None:
            log.error("verifying a token failed: %r", task.exception())
            self._close(INTERNAL_ERROR, "cannot verify the caller")
            return
        self._fresh = task.result()  # the answer for the held-back stream, even if already stale
        self._transport.resume_reading()
        self.data_received(b"")
        self._fresh = None

    def _on_settings(self, payload: bytes) -> None:
        if len(payload) % 6:
            raise _ConnectionError(FRAME_SIZE_ERROR, "bad SETTINGS length")
        for i in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, i)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "window too large")
                delta, self._peer_initial = value - self._peer_initial, value
                for stream in self._streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                self._peer_max_frame = value
        self._out.append(frame(SETTINGS, ACK, 0))
        self._send_pending()

    def _on_window_update(self, sid: int, payload: bytes) -> None:
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if increment == 0:
            if sid == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "window update of 0")
            return
        if sid == 0:
            self._peer_window += increment
        elif (stream := self._streams.get(sid)) is not None:
            stream.send_window += increment
        self._send_pending()

    # calls

    def _read_messages(self, sid: int, stream: _Stream) -> None:
        buf = stream.buffer
        while len(buf) >= 5 and not stream.closed and stream.waiting is None:
            compressed, length = _MESSAGE_HEAD.unpack_from(buf, 0)
            if length > self._max_message:
                self._end(sid, stream, trailers(RESOURCE_EXHAUSTED, "message larger than the limit"))
                return
            if len(buf) < 5 + length:
                return
            message = bytes(buf[5:5 + length])
            del buf[:5 + length]
            if compressed:
                self._end(sid, stream, trailers(UNIMPLEMENTED, "compressed messages are not supported"))
                return
            try:
                response, done = stream.call.on_message(message)
            except Exception:  # the call answers its own errors; this is a bug, never a crash
                log.exception("gRPC call failed")
                self._end(sid, stream, trailers(INTERNAL, "internal error"))
                return
            if isinstance(response, list):  # several messages in one DATA frame where the windows allow
                if response:
                    self._send(sid, stream, b"".join([_MESSAGE_HEAD.pack(0, len(one)) + one for one in response]))
            elif response is not None:
                if isinstance(response, Deferred):  # answered later: the next messages wait
                    self._defer(sid, stream, response)
                    continue
                self._send(sid, stream, _MESSAGE_HEAD.pack(0, len(response)) + response)
            if done:
                self._end(sid, stream, TRAILERS_OK)

    def _defer(self, sid: int, stream: _Stream, deferred: Deferred) -> None:
        """A call answers later: until then its stream's messages wait (`_read_messages` stops)."""
        ready = deferred.bind(lambda answers, done, failure: self._answered_later(sid, stream, deferred, answers,
                                                                                  done, failure))
        if ready is None:
            stream.waiting = deferred
        else:  # answered already: as if at once
            self._answer(sid, stream, *ready)

    def _answered_later(self, sid: int, stream: _Stream, deferred: Deferred, answers: Answers, done: bool,
                        failure: str | None) -> None:
        """A deferred answer, from the event loop: written if its stream is still open here, then the
        messages that waited behind it."""
        if stream.waiting is not deferred or self._transport is None or self._streams.get(sid) is not stream:
            return  # reset, or the connection is gone: the call was told (`on_close`)
        stream.waiting = None
        try:
            self._answer(sid, stream, answers, done, failure)
            if not stream.closed:
                self._read_messages(sid, stream)
            if stream.client_done and stream.waiting is None:
                self._client_ended(sid)
        except _ConnectionError as exc:
            self._close(exc.code, str(exc))
            return
        except Exception:  # a bug here must cost one connection, never the event loop
            log.exception("HTTP/2 connection failed")
            self._close(INTERNAL_ERROR, "internal error")
            return
        self._flush()

    def _answer(self, sid: int, stream: _Stream, answers: Answers, done: bool, failure: str | None) -> None:
        """A deferred call's answer (an answer given at once is written by `_read_messages` itself)."""
        if failure is not None:
            log.error("gRPC call failed: %s", failure)
            self._end(sid, stream, trailers(INTERNAL, "internal error"))
            return
        if isinstance(answers, list):
            if answers:
                self._send(sid, stream, b"".join([_MESSAGE_HEAD.pack(0, len(one)) + one for one in answers]))
        elif answers is not None:
            self._send(sid, stream, _MESSAGE_HEAD.pack(0, len(answers)) + answers)
        if done:
            self._end(sid, stream, TRAILERS_OK)

    def _client_ended(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None or stream.closed:
            return
        if stream.waiting is not None:  # after the answer to come, and the messages behind it
            stream.client_done = True
            return
        last = getattr(stream.call, "on_client_end", None)
        if last is not None:
            try:
                message = last()
            except Exception:
                log.exception("gRPC call failed")
                self._end(sid, stream, trailers(INTERNAL, "internal error"))
                return
            if message is not None:
                self._send(sid, stream, _MESSAGE_HEAD.pack(0, len(message)) + message)
        self._end(sid, stream, TRAILERS_OK)

    def _send(self, sid: int, stream: _Stream, data: bytes) -> None:
        if not stream.headers_sent:
            stream.headers_sent = True
            self._out.append(frame(HEADERS, END_HEADERS, sid, RESPONSE_HEADERS))
        stream.pending.append(data)
        self._send_stream(sid, stream)

    def _end(self, sid: int, stream: _Stream, trailer_block: bytes) -> None:
        stream.closed = True
        stream.buffer.clear()
        _closed(stream.call)
        if not stream.headers_sent:
            self._out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, RESPONSE_HEADERS + trailer_block))
            self._streams.pop(sid, None)
            return
        stream.pending.append(trailer_block)  # sent as a HEADERS frame once the data before it is out
        self._send_stream(sid, stream)

    def _send_stream(self, sid: int, stream: _Stream) -> None:
        """Sends what flow control allows; the last pending item of a closed stream is its trailers."""
        pending = stream.pending
        while pending:
            if stream.closed and len(pending) == 1:
                self._out.append(frame(HEADERS, END_HEADERS | END_STREAM, sid, pending.pop()))
                self._streams.pop(sid, None)
                return
            data = pending[0]
            allowed = min(self._peer_window, stream.send_window, len(data))
            if allowed <= 0 and data:
                return
            max_frame = self._peer_max_frame
            for start in range(0, allowed, max_frame):
                self._out.append(frame(DATA, 0, sid, data[start:start + min(max_frame, allowed - start)]))
            self._peer_window -= allowed
            stream.send_window -= allowed
            if allowed < len(data):
                pending[0] = data[allowed:]
                return
            pending.pop(0)

    def _send_pending(self) -> None:
        for sid, stream in list(self._streams.items()):
            if stream.pending:
                self._send_stream(sid, stream)

    def _flush(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
        self._out.clear()

    def _close(self, code: int, reason: str) -> None:
        log.warning("closing an HTTP/2 connection from Envoy: %s", reason)
        if self._transport is not None:
            self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(code) + reason.encode()))
            self._flush()
            self._transport.close()
            self._transport = None


class _Unverified(Exception):
    """A new stream's token must be verified before the stream can be opened."""

    def __init__(self, token: str):
        super().__init__("token not verified yet")
        self.token = token


class _ConnectionError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def _closed(call: Call) -> None:
    """Tells a call that defines `on_close()` that its stream is over, however it ended (answered,
    reset by the client, connection lost), so it can let go of what it holds."""
    on_close = getattr(call, "on_close", None)
    if on_close is not None:
        try:
            on_close()
        except Exception:
            log.exception("gRPC call failed to close")


def _unpad(payload: bytes) -> bytes:
    pad = payload[0] if payload else 0
    if pad >= len(payload):
        raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
    return payload[1:len(payload) - pad]


async def serve(host: str, port: int, methods: dict[str, Callable[[Caller | None], Call]], max_message: int,
                authenticator: Authenticator | None = None, registry: set | None = None,
                reuse_port: bool = False) -> asyncio.Server:
    """Over TCP; with an authenticator, every stream must prove its caller. `registry` collects the
    open connections (for a graceful drain); `reuse_port` lets worker processes share the port."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: H2Connection(methods, max_message, authenticator, registry), host, port,
                                    reuse_port=reuse_port or None)


async def serve_unix(path: str, methods: dict[str, Callable[[Caller | None], Call]], max_message: int,
                     registry: set | None = None, local: Caller = LOCAL) -> asyncio.Server:
    """On a Unix socket (mode 0600, in a directory only our user can open): the caller is local,
    as the operator states it (`--source-labels`, `--source-namespace`), else `LOCAL`."""
    loop = asyncio.get_running_loop()
    old = os.umask(0o177)
    try:
        server = await loop.create_unix_server(lambda: H2Connection(methods, max_message, None, registry, local),
                                               path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server
