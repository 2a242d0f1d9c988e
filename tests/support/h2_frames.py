"""Raw HTTP/2 frames for tests of the lean gRPC server (`extproc.dataplane.grpc_h2`): what a gRPC
client library rarely sends but a peer may (a reset, a connection dropped mid-call)."""

from __future__ import annotations

import socket
import struct

import hpack

from extproc.dataplane import grpc_h2 as h2

Frame = tuple[int, int, int, bytes]  # type, flags, stream id, payload


def frames_until(sock: socket.socket, wanted, limit: int = 50) -> list[Frame]:
    """Reads frames until `wanted(frames)` is true (or the peer closes, or `limit` frames)."""
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


def request_headers(method: str) -> bytes:
    return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", method),
                                   (":authority", "x"), ("content-type", "application/grpc"), ("te", "trailers")])


def grpc_message(data: bytes) -> bytes:
    return struct.pack(">BI", 0, len(data)) + data


def opening() -> bytes:
    """The client's preface and SETTINGS."""
    return h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)


def ended(sid: int):
    """A `wanted` for frames_until: stream `sid`'s trailers (END_STREAM) have come."""
    return lambda frames: any(f[0] == h2.HEADERS and f[1] & h2.END_STREAM and f[2] == sid for f in frames)
