"""Property-based fuzzing of the lean HTTP/2 server: whatever Envoy (or anything else reaching its
port) sends, it answers with well-formed frames or closes the connection with GOAWAY; it never
raises. (Settings and a long run: support/fuzz.py.)"""

from __future__ import annotations

import logging
import struct

import hpack
from hypothesis import given
from hypothesis import strategies as st

from extproc.dataplane import grpc_h2 as h2
from support.fuzz import fuzz


class _Failures(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("HTTP/2 connection failed"):
            self.seen.append(record.exc_text or record.getMessage())


class _Transport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.out += data

    def close(self) -> None:
        self.closed = True


class _Echo:
    def on_message(self, message: bytes):
        if message.startswith(b"!"):
            raise RuntimeError("a bug in a handler")
        return [message, message] if message.startswith(b"2") else message, message.startswith(b"end")


_HEADER_BLOCK = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/t/M"),
                                        (":authority", "x"), ("content-type", "application/grpc")])
_frames = st.builds(
    lambda ftype, flags, sid, payload: h2.frame(ftype, flags, sid, payload),
    st.integers(0, 10), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
    st.one_of(st.binary(max_size=40), st.just(_HEADER_BLOCK),
              st.binary(max_size=30).map(lambda m: struct.pack(">BI", 0, len(m)) + m),
              st.just(struct.pack(">BI", 0, 10**6)), st.just(b"\0\0\0\0")),
)


def _well_formed(data: bytes) -> None:
    """Every byte the server wrote belongs to a complete frame of a known type."""
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9
        length = int.from_bytes(data[pos:pos + 3], "big")
        assert data[pos + 3] <= h2.CONTINUATION
        pos += 9 + length
    assert pos == len(data)


@fuzz
@given(st.lists(_frames, max_size=25), st.lists(st.integers(1, 200), max_size=10), st.booleans())
def test_h2_server_never_raises(frames, cuts, with_preface):
    wire = (h2.PREFACE if with_preface else b"") + b"".join(frames)
    transport = _Transport()
    connection = h2.H2Connection({"/t/M": lambda identity: _Echo()}, max_message=1000)
    connection.connection_made(transport)
    failures = _Failures()
    logging.getLogger("extproc.dataplane.grpc_h2").addHandler(failures)
    try:
        pos = 0
        for cut in [*cuts, len(wire)]:
            if pos >= len(wire):
                break
            connection.data_received(wire[pos:pos + cut])  # also after a close, as asyncio may
            pos += cut
    finally:
        logging.getLogger("extproc.dataplane.grpc_h2").removeHandler(failures)
    assert failures.seen == [], "the connection's last-resort catch was reached: a bug"
    _well_formed(bytes(transport.out))
    if not with_preface and wire and not wire.startswith(h2.PREFACE[:len(wire)]):
        assert transport.closed
