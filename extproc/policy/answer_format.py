"""The client's answer format: which requests need their answer processed, and how. Pure decisions.

A client that sends `"stream": true` reads server-sent events; one that does not reads one JSON
answer. A provider config may force `stream` either way (the seed's Moonshot: `stream: false`),
so what the provider sends can differ from what the client asked for, on the first attempt and on
a failover attempt to another provider. Such a request's answer comes back through the gateway
(`extproc.dataplane.answer_exchange`) and is turned into the client's format; every other
request keeps the path it had, with no extra message (docs/api.md, "Streamed or not").

Two decisions, both here:
- at the request, `answer_plan`: may any provider this request can reach answer in another
  format than the client asked for? (None: no; the answer passes Envoy as it comes.)
- at the answer, `conversion`: given what the provider actually sent (status, content type), which
  conversion, if any, turns it into the client's format. An error answer is never converted: a
  client that asked for a stream gets the provider's JSON error, as the OpenAI API sends it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from .openai_api import CHAT, Endpoint, configured_stream
from .table import Failover, Target

# The conversions an answer can need (`conversion`); the data plane has one converter for each.
JSON_TO_EVENTS = "json_to_events"  # one JSON answer -> server-sent events (chunks, [DONE])
EVENTS_TO_JSON = "events_to_json"  # server-sent events -> one JSON answer

EVENT_STREAM = "text/event-stream"
JSON = "application/json"


class AnswerPlan(NamedTuple):
    """What the client asked for, carried from its request to its answer."""

    client_stream: bool  # the client sent "stream": true
    include_usage: bool  # ... and "stream_options": {"include_usage": true}
    check: bool = False  # a data policy checks the answer (`responses.check`)


def answer_plan(endpoint: Endpoint, target: Target, failover: Failover | None, client_stream: bool,
                include_usage: bool, check: bool = False) -> AnswerPlan | None:
    """A plan when a provider this request may reach is configured to answer in the other
    format (its `stream` set, and not to the client's): the first attempt's, or for a rule with
    `retries` any provider of its attempt orders; or when a data policy checks its answer
    (`check`, for the endpoints whose answers carry a model's text). None otherwise: the answer
    is not processed. The config's `stream` is a chat setting (`configured_stream`); the common
    case (no `stream` set, no retries, no check) costs three comparisons."""
    if check and endpoint.streams:  # chat and completions: the endpoints whose answers carry a model's text
        return AnswerPlan(client_stream, include_usage, True)
    forced = target.stream
    if forced is not None and forced is not client_stream and endpoint is CHAT:
        return AnswerPlan(client_stream, include_usage)
    if failover is not None and _any_forced_other(endpoint, failover.orders[0], client_stream):
        return AnswerPlan(client_stream, include_usage)
    return None


def _any_forced_other(endpoint: Endpoint, order: Iterable[Target], client_stream: bool) -> bool:
    """Every attempt order of a rule holds all its providers: the first one is enough to ask."""
    for target in order:
        forced = configured_stream(endpoint, target)
        if forced is not None and forced != client_stream:
            return True
    return False


def conversion(client_stream: bool, status: int, content_type: str) -> str | None:
    """The conversion an answer needs to reach the client in the format it asked for, or None to
    pass it as it is: an error status, or an answer already in the client's format (a failover
    attempt to a provider that keeps the client's `stream`), or one of another kind."""
    if not 200 <= status < 300:
        return None
    kind = content_type.split(";", 1)[0].strip().lower()
    if client_stream and kind == JSON:
        return JSON_TO_EVENTS
    if not client_stream and kind == EVENT_STREAM:
        return EVENTS_TO_JSON
    return None


# How a checked answer's body comes to the exchange (`check_mode`)
CHECK_STREAM = "check_stream"  # piece by piece, as the provider streams it (Envoy's STREAMED mode)
CHECK_WHOLE = "check_whole"  # whole (JSON, or an answer converted whole)


def check_mode(client_stream: bool, status: int, content_type: str, kind: str | None) -> str | None:
    """How a checked answer (`AnswerPlan.check`) is read: a stream the client reads as a stream
    piece by piece, so it stays incremental; a JSON answer, or one converted whole (`kind`),
    whole. None: not a model's answer (an error status, another content type): passed as it is."""
    if not 200 <= status < 300:
        return None
    media = content_type.split(";", 1)[0].strip().lower()
    if kind is None and client_stream and media == EVENT_STREAM:
        return CHECK_STREAM
    if kind is not None or media == JSON:
        return CHECK_WHOLE
    return None
