"""What the official `anthropic` SDK makes of a stream of Messages API events: each event validated
as the SDK's own type and accumulated by the SDK's own accumulator (as `messages.stream()` does)."""

from __future__ import annotations

import json

from anthropic.lib.streaming._messages import accumulate_event
from anthropic.types import RawMessageStreamEvent
from pydantic import TypeAdapter

from extproc.translation.sse import EventSplitter


def sdk_message(events: bytes):
    """The final message and the events' names; an error event raises its message."""
    adapter = TypeAdapter(RawMessageStreamEvent)
    snapshot, bufs, names = None, {}, []
    splitter = EventSplitter()
    for event in [*splitter.feed(events), *splitter.flush()]:
        names.append(event.name)
        if event.name == "ping":  # skipped by the SDK's stream
            continue
        if event.name == "error":
            raise RuntimeError(json.loads(event.data)["error"]["message"])
        snapshot = accumulate_event(event=adapter.validate_python(json.loads(event.data)), current_snapshot=snapshot,
                                    json_bufs=bufs)
    return snapshot, names


