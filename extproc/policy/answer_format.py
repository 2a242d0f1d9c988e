"""The client's answer format: which requests need their answer processed, and how. Pure decisions.

A client that sends `"stream": true` reads server-sent events; one that does not reads one JSON
answer. A provider config may force `stream` either way (the seed's Moonshot: `stream: false`),
so what the provider sends can differ from what the client asked for, on the first attempt and on
a failover attempt to another provider. Such a request's answer comes back through the gateway
(`extproc.dataplane.answer_exchange`) and is turned into the client's format; every other
request keeps the path it had, with no extra message (docs/api.md, "Streamed or not").

The same way comes back every answer of a request whose client or provider speaks another API
than OpenAI's (docs/translation.md): it is translated into the client's API, or, one API other
than OpenAI's on both sides, passed on while its usage is read (Envoy's readers know OpenAI's
shapes only).

Three decisions, all here:
- at the request, `answer_plan`: may any provider this request can reach answer in another
  format or API than the client's? (None: no; the answer passes Envoy as it comes.)
- at the request, `per_attempt`: must each attempt of a rule with retries have the client's body
  translated for its own provider (its providers speak several APIs)?
- at the answer, `conversion`: given what the provider actually sent (status, content type), which
  conversion, if any, turns it into the client's format. Between OpenAI's APIs an error answer is
  never converted: a client that asked for a stream gets the provider's JSON error, as the OpenAI
  API sends it; across APIs it is translated into the client's API's error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from ..errors import GatewayError
from .openai_api import CHAT, Endpoint, configured_stream
from .table import OPENAI_API, Failover, Target

# The conversions an answer can need (`conversion`); the data plane has one converter for each.
JSON_TO_EVENTS = "json_to_events"  # one JSON answer -> server-sent events (chunks, [DONE])
EVENTS_TO_JSON = "events_to_json"  # server-sent events -> one JSON answer
# ... and across APIs (extproc.translation.answers)
TRANSLATE_STREAM = "translate_stream"  # the provider's stream into the client's, event by event
TRANSLATE_WHOLE = "translate_whole"  # a whole answer (or error) into the client's API and format
OBSERVE_STREAM = "observe_stream"  # one API other than OpenAI's on both sides: passed on, usage read
OBSERVE_WHOLE = "observe_whole"
STREAMED = frozenset({TRANSLATE_STREAM, OBSERVE_STREAM})  # the answer's body comes piece by piece

EVENT_STREAM = "text/event-stream"
AWS_EVENT_STREAM = "application/vnd.amazon.eventstream"  # Bedrock's streams
JSON = "application/json"


# A client of another API than OpenAI's on a route whose data policy checks answers
CHECK_REFUSED = GatewayError(
    400, "this route's data policy checks answers (responses.check), which the gateway does in OpenAI's API: "
    "send the request to .../chat/completions", "answer_check_unsupported")


class AnswerPlan(NamedTuple):
    """What the client asked for, carried from its request to its answer."""

    client_stream: bool  # the client sent "stream": true
    include_usage: bool  # ... and "stream_options": {"include_usage": true}
    client_api: str = OPENAI_API  # the API the client speaks
    check: bool = False  # a data policy checks the answer (`responses.check`)


def answer_plan(endpoint: Endpoint, target: Target, failover: Failover | None, client_stream: bool,
                include_usage: bool, check: bool = False) -> AnswerPlan | None:
    """A plan when a provider this request may reach is configured to answer in the other
    format (its `stream` set, and not to the client's): the first attempt's, or for a rule with
    `retries` any provider of its attempt orders; or when a data policy checks its answer
    (`check`, for the endpoints whose answers carry a model's text). None otherwise: the answer
    is not processed. The config's `stream` is a chat setting (`configured_stream`). A provider or
    client of another API than OpenAI's: always (the answer is translated, or its usage read). The
    common case (OpenAI on both sides, no `stream` set, no retries, no check) costs five comparisons.

    Answers are checked in OpenAI's shape (a provider of another API: translated first): a client
    of another API, whose answer would have to be checked in its own, is refused (`CHECK_REFUSED`)
    rather than answered unchecked."""
    check = check and endpoint.streams  # chat and completions: the endpoints whose answers carry a model's text
    client_api = endpoint.client_api
    if check and client_api != OPENAI_API:
        raise CHECK_REFUSED
    if client_api != OPENAI_API or target.body_api != OPENAI_API:
        return AnswerPlan(client_stream, include_usage, client_api, check)
    if check:
        return AnswerPlan(client_stream, include_usage, check=True)
    forced = target.stream
    if forced is not None and forced is not client_stream and endpoint is CHAT:
        return AnswerPlan(client_stream, include_usage)
    if failover is not None and (len(failover.body_apis) > 1 or OPENAI_API not in failover.body_apis
                                 or _any_forced_other(endpoint, failover.orders[0], client_stream)):
        return AnswerPlan(client_stream, include_usage)
    return None


def per_attempt(endpoint: Endpoint, failover: Failover) -> bool:
    """Whether each attempt of a request with retries, the first included, has the client's own
    body translated for its provider: the rule's providers do not all speak the client's API
    (OpenAI's, where a retried attempt's body is the first attempt's, model and stream set again)."""
    apis = failover.body_apis
    return endpoint.client_api != OPENAI_API or len(apis) > 1 or OPENAI_API not in apis


def _any_forced_other(endpoint: Endpoint, order: Iterable[Target], client_stream: bool) -> bool:
    """Every attempt order of a rule holds all its providers: the first one is enough to ask."""
    for target in order:
        forced = configured_stream(endpoint, target)
        if forced is not None and forced != client_stream:
            return True
    return False


def conversion(client_stream: bool, status: int, content_type: str, client_api: str = OPENAI_API,
               provider_api: str = OPENAI_API) -> str | None:
    """The conversion an answer needs to reach the client in the format (and API) it asked for,
    or None to pass it as it is: between OpenAI's APIs an error status, or an answer already in
    the client's format (a failover attempt to a provider that keeps the client's `stream`), or
    one of another kind. `provider_api`: what the answering provider's bodies look like."""
    if client_api != OPENAI_API or provider_api != OPENAI_API:
        return _across(client_stream, status, content_type, client_api, provider_api)
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


def _across(client_stream: bool, status: int, content_type: str, client_api: str, provider_api: str) -> str | None:
    """An answer between two APIs (or one other than OpenAI's on both sides): a stream the client
    wants as a stream goes event by event; everything else is handled whole (an error, JSON, a
    stream the client wants as one answer)."""
    same = client_api == provider_api
    if not 200 <= status < 300:
        return None if same else TRANSLATE_WHOLE
    kind = content_type.split(";", 1)[0].strip().lower()
    streamed = kind in (EVENT_STREAM, AWS_EVENT_STREAM)
    if same:
        return OBSERVE_STREAM if streamed else OBSERVE_WHOLE
    return TRANSLATE_STREAM if streamed and client_stream else TRANSLATE_WHOLE
