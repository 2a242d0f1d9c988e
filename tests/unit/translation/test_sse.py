"""Server-sent events out of arbitrary chunks: whatever the split, the same events, in order;
CRLF line ends (Gemini's), named events (Anthropic's), comments, an event without its blank line."""

from __future__ import annotations

import pytest

from extproc.translation.sse import Event, EventSplitter, parse_event

STREAM = (b"event: message_start\ndata: {\"a\": 1}\n\n"
          b": a comment\n\n"
          b"data: line one\ndata: line two\n\n"
          b"event: ping\ndata:{}\n\n")
EVENTS = [Event("message_start", b'{"a": 1}'), Event("", b"line one\nline two"), Event("ping", b"{}")]


def feed_in_pieces(data: bytes, sizes: int) -> list[Event]:
    splitter = EventSplitter()
    out = []
    for i in range(0, len(data), sizes):
        out.extend(splitter.feed(data[i:i + sizes]))
    return out + splitter.flush()


@pytest.mark.parametrize("size", [1, 2, 3, 7, 16, len(STREAM)])
def test_the_same_events_whatever_the_chunks(size):
    assert feed_in_pieces(STREAM, size) == EVENTS


@pytest.mark.parametrize("size", [1, 5, 1000])
def test_crlf_line_ends(size):
    assert feed_in_pieces(STREAM.replace(b"\n", b"\r\n"), size) == EVENTS


def test_an_event_without_its_blank_line_comes_at_the_end():
    splitter = EventSplitter()
    assert splitter.feed(b"data: 1\n\ndata: 2") == [Event("", b"1")]
    assert splitter.flush() == [Event("", b"2")]
    assert splitter.flush() == []


def test_a_block_of_comments_is_no_event():
    assert parse_event(b": keep-alive") is None
    assert parse_event(b"data:") == Event("", b"")
