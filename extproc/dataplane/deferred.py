"""An answer a gRPC call gives later: the one way for a call on the lean HTTP/2 server
(`extproc.dataplane.grpc_h2`) to wait for something (a Redis round trip, a model asked to judge
a prompt) before it answers a message.

The server answers each message straight from the socket callback: `call.on_message(message)`
returns the answers at once. A call that cannot answer yet returns a `Deferred` in place of its
answers, keeps it, and later calls `answer(answers, done)` (or `fail(reason)`) on it, from the
event loop. Meanwhile the server hands the call nothing more: the stream's later messages wait in
its buffer (a client's end of stream too), so a call still sees its messages one at a time and in
order, and its answers leave in order. When the answer comes the server writes it (flow control
as for any answer), then goes on with the messages that waited. If the stream is reset or the
connection lost meanwhile, the call is told as always (`on_close`) and the late answer is dropped.

Nothing here runs for a call that answers at once: a `Deferred` (and whatever the call awaits) is
made only by a call that has to wait, so the synchronous path costs what it did.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

# what a call answers: one message, several (one DATA frame where the windows allow), or none
Answers = bytes | list[bytes] | None
# where the server wants the answer: (answers, done, failure); failure is None or why the call failed
Delivery = Callable[[Answers, bool, str | None], None]


class Deferred:
    """The answer to one message, to come. Made by the call; `answer` or `fail` once (later
    calls are ignored); the server `bind`s it to the stream it is for."""

    __slots__ = ("_deliver", "_ready")

    def __init__(self) -> None:
        self._deliver: Delivery | None = None
        self._ready: tuple[Answers, bool, str | None] | None = None  # answered before the server bound it

    def answer(self, answers: Answers, done: bool) -> None:
        """The answers to the message (as `on_message` returns them), and whether the call is over."""
        self._settle((answers, done, None))

    def fail(self, reason: str) -> None:
        """The call could not answer (a bug): the stream ends with gRPC status INTERNAL, never a
        stack trace to the client."""
        self._settle((None, True, reason))

    @property
    def settled(self) -> bool:
        return self._ready is not None

    def bind(self, deliver: Delivery) -> tuple[Answers, bool, str | None] | None:
        """For the server: where the answer goes. What was answered already (before the server
        bound it) is returned instead, for the server to handle as an answer given at once."""
        if self._ready is not None:
            ready, self._ready = self._ready, (None, False, None)
            return ready
        self._deliver = deliver
        return None

    def _settle(self, result: tuple[Answers, bool, str | None]) -> None:
        if self._ready is not None:
            return  # answered once already
        self._ready = result
        deliver, self._deliver = self._deliver, None
        if deliver is not None:
            try:
                deliver(*result)
            except Exception:  # the server's own failure must not reach whoever answered
                log.exception("delivering a deferred gRPC answer failed")
