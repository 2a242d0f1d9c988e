"""The same gRPC handling as `extproc/dataplane/grpc_h2.py`, on python-hyper's `h2` state machine:
for the side-by-side measurement of scripts/bench (`--h2-library`), not used by the gateway. The
bench copies this file into a copy of `extproc/dataplane/` and rebinds `grpc_h2.serve` and
`grpc_h2.serve_unix` to the ones here (`benchmarks.contenders.h2_library_source`).

Same contract: `serve(host, port, methods, max_message, ...)` and `serve_unix(path, methods,
max_message, ...)`, a method's factory given the caller, methods keyed by path or by
"authority/path", each message answered straight from the socket callback by a synchronous `Call`
told `on_close()` when its stream is over, everything a callback produced leaving in one write,
connections in `registry` answering `open_streams` and `go_away()` for a graceful drain. Local
callers only: a Unix socket, or TCP without an authenticator.
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
from collections.abc import Callable

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from extproc.policy.caller import LOCAL

log = logging.getLogger("extproc.h2lib")

_MESSAGE_HEAD = struct.Struct(">BI")
RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
OK_TRAILERS = [("grpc-status", "0")]
UNIMPLEMENTED, INTERNAL, RESOURCE_EXHAUSTED = 12, 13, 8


class _Stream:
    __slots__ = ("call", "buffer", "headers_sent", "pending", "closed")

    def __init__(self, call) -> None:
        self.call = call
        self.buffer = bytearray()
        self.headers_sent = False
        self.pending: list[bytes | list] = []  # message bytes, or a trailers list last
        self.closed = False


def _closed(call) -> None:
    """Tells a call that defines `on_close()` that its stream is over, however it ended."""
    on_close = getattr(call, "on_close", None)
    if on_close is not None:
        try:
            on_close()
        except Exception:
            log.exception("gRPC call failed to close")


class H2LibraryConnection(asyncio.Protocol):
    def __init__(self, methods: dict[str, Callable[[object], object]], max_message: int, registry: set | None = None):
        self._methods = methods
        self._max_message = max_message
        self._registry = registry
        config = h2.config.H2Configuration(client_side=False, header_encoding=None, validate_inbound_headers=False,
                                           validate_outbound_headers=False, normalize_outbound_headers=False)
        self._conn = h2.connection.H2Connection(config=config)
        self._streams: dict[int, _Stream] = {}
        self._transport = None

    def connection_made(self, transport) -> None:
        self._transport = transport
        if self._registry is not None:
            self._registry.add(self)
        self._conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.HEADER_TABLE_SIZE: 0,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: (1 << 31) - 1,
            h2.settings.SettingCodes.MAX_FRAME_SIZE: (1 << 24) - 1})
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window((1 << 31) - 1 - 65535)
        transport.write(self._conn.data_to_send())

    def connection_lost(self, exc) -> None:
        for stream in self._streams.values():
            if not stream.closed:
                _closed(stream.call)
        self._streams.clear()
        self._transport = None
        if self._registry is not None:
            self._registry.discard(self)

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def go_away(self) -> None:
        """Graceful shutdown: no new streams; those open are still served."""
        if self._transport is not None:
            self._conn.close_connection(last_stream_id=(1 << 31) - 1)
            self._write()

    def data_received(self, data: bytes) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            log.warning("closing an HTTP/2 connection from Envoy: %s", exc)
            self._write()
            if self._transport is not None:
                self._transport.close()
            return
        for event in events:
            if isinstance(event, h2.events.RequestReceived):
                headers = dict(event.headers)
                path = headers.get(b":path", b"").decode()
                authority = headers.get(b":authority", b"").decode()
                factory = self._methods.get(authority + path) or self._methods.get(path)
                if factory is None:
                    self._conn.send_headers(event.stream_id, RESPONSE_HEADERS + [("grpc-status", str(UNIMPLEMENTED))],
                                            end_stream=True)
                    continue
                self._streams[event.stream_id] = _Stream(factory(LOCAL))
            elif isinstance(event, h2.events.DataReceived):
                if event.flow_controlled_length:  # keep Envoy's windows open
                    self._conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                stream = self._streams.get(event.stream_id)
                if stream is not None and not stream.closed:
                    stream.buffer += event.data
                    self._read_messages(event.stream_id, stream)
            elif isinstance(event, h2.events.StreamEnded):
                self._client_ended(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                stream = self._streams.pop(event.stream_id, None)
                if stream is not None and not stream.closed:
                    _closed(stream.call)
            elif isinstance(event, h2.events.WindowUpdated):
                self._send_pending()
        self._write()

    def _read_messages(self, sid: int, stream: _Stream) -> None:
        buf = stream.buffer
        while len(buf) >= 5 and not stream.closed:
            compressed, length = _MESSAGE_HEAD.unpack_from(buf, 0)
            if length > self._max_message:
                self._end(sid, stream, [("grpc-status", str(RESOURCE_EXHAUSTED))])
                return
            if len(buf) < 5 + length:
                return
            message = bytes(buf[5:5 + length])
            del buf[:5 + length]
            try:
                response, done = stream.call.on_message(message)
            except Exception:
                log.exception("gRPC call failed")
                self._end(sid, stream, [("grpc-status", str(INTERNAL))])
                return
            for one in (response if isinstance(response, list) else [response] if response is not None else []):
                stream.pending.append(_MESSAGE_HEAD.pack(0, len(one)) + one)
            if done:
                self._end(sid, stream, OK_TRAILERS)
            else:
                self._send_stream(sid, stream)

    def _client_ended(self, sid: int) -> None:
        stream = self._streams.get(sid)
        if stream is None or stream.closed:
            return
        last = getattr(stream.call, "on_client_end", None)
        if last is not None:
            message = last()
            if message is not None:
                stream.pending.append(_MESSAGE_HEAD.pack(0, len(message)) + message)
        self._end(sid, stream, OK_TRAILERS)

    def _end(self, sid: int, stream: _Stream, trailers: list) -> None:
        stream.closed = True
        _closed(stream.call)
        stream.pending.append(trailers)
        self._send_stream(sid, stream)

    def _send_stream(self, sid: int, stream: _Stream) -> None:
        conn = self._conn
        if not stream.headers_sent and stream.pending:
            stream.headers_sent = True
            conn.send_headers(sid, RESPONSE_HEADERS)
        while stream.pending:
            item = stream.pending[0]
            if isinstance(item, list):
                conn.send_headers(sid, item, end_stream=True)
                stream.pending.pop(0)
                self._streams.pop(sid, None)
                return
            window = min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)
            if window <= 0:
                return
            conn.send_data(sid, item[:window])
            if window < len(item):
                stream.pending[0] = item[window:]
            else:
                stream.pending.pop(0)

    def _send_pending(self) -> None:
        for sid, stream in list(self._streams.items()):
            if stream.pending:
                self._send_stream(sid, stream)

    def _write(self) -> None:
        data = self._conn.data_to_send()
        if data and self._transport is not None:
            self._transport.write(data)


async def serve(host: str, port: int, methods: dict[str, Callable[[object], object]], max_message: int,
                authenticator=None, registry: set | None = None, reuse_port: bool = False) -> asyncio.Server:
    if authenticator is not None:
        raise ValueError("the h2-library variant serves local callers only: no authenticator")
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: H2LibraryConnection(methods, max_message, registry), host, port,
                                    reuse_port=reuse_port or None)


async def serve_unix(path: str, methods: dict[str, Callable[[object], object]], max_message: int,
                     registry: set | None = None) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    old = os.umask(0o177)
    try:
        server = await loop.create_unix_server(lambda: H2LibraryConnection(methods, max_message, registry), path)
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return server
