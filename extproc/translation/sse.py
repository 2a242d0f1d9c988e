"""Server-sent events read out of arbitrary chunks: an event may be split across chunks, a chunk
may hold several; complete events come out, the rest waits for the next chunk."""

from __future__ import annotations

from typing import NamedTuple


class Event(NamedTuple):
    name: str  # the `event:` field ("" when none: "message")
    data: bytes  # the `data:` lines, joined with "\n"


def parse_event(block: bytes) -> Event | None:
    """One event's block (its lines without the blank line ending it); None for a block of
    comments only (`: ping`)."""
    name, data, seen = "", [], False
    for line in block.split(b"\n"):
        if line.startswith(b"data:"):
            data.append(line[5:].removeprefix(b" "))
            seen = True
        elif line.startswith(b"event:"):
            name = line[6:].strip().decode("utf-8", "replace")
            seen = True
    return Event(name, b"\n".join(data)) if seen else None


class EventSplitter:
    """Complete events out of chunks as they come; an incomplete one is kept for the next."""

    __slots__ = ("_tail",)

    def __init__(self) -> None:
        self._tail = b""

    def feed(self, data: bytes) -> list[Event]:
        buffer = self._tail + data if self._tail else data
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        blocks = buffer.split(b"\n\n")
        self._tail = blocks.pop()
        return [event for block in blocks if (event := parse_event(block)) is not None]

    def flush(self) -> list[Event]:
        """What is left at the end of the stream, as a last event (a stream may end without the
        blank line after its last event)."""
        tail, self._tail = self._tail.strip(b"\n"), b""
        event = parse_event(tail) if tail else None
        return [event] if event is not None else []
