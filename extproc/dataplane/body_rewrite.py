"""Request body rewrite: the client's chat request turned into the provider's. Pure functions.

Between OpenAI's API on both sides (Azure OpenAI's included) the body keeps its shape: the
model, `stream` and `stream_options` are set. Where the client or the provider speaks another API
(docs/translation.md) the body is translated (`extproc.translation.requests`), and the request
may need its own path (Gemini and Bedrock name the model and the stream in it) and headers
(Bedrock's SigV4 signature over the body).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from ..errors import GatewayError
from ..policy.openai_api import CHAT, Endpoint, check_body, configured_model, configured_stream
from ..policy.provider_api import BEDROCK, GEMINI, NO_SETTINGS, request_path, serves
from ..policy.table import OPENAI_API, Target
from ..translation.bedrock import sign
from ..translation.requests import translate_request


class Rewritten(NamedTuple):
    body: bytes
    stream: bool  # the provider is asked for server-sent events
    model: str  # the model the provider is asked for
    client_stream: bool = False  # the body asked for server-sent events (the client's own, on a first attempt)
    include_usage: bool = False  # ... and for the usage event (`stream_options.include_usage`)
    own: Own | None = None  # a translated request's own path and headers (None: the target's)


class Own(NamedTuple):
    """What one request to a provider of another API has of its own: its path where the model and
    the stream are in it (Gemini, Bedrock; None: the target's), its headers (Bedrock's signature)."""

    path: str | None
    headers: tuple[tuple[str, str], ...]


# orjson reads integers only up to 64 bits: a larger one becomes a float. A body where orjson gave
# such a float (integral, 2**63 or more) is read again on the standard library's exact path. The
# check walks the parsed values, not the bytes, so a long string costs nothing (a byte scan for
# runs of digits took 15 ms per MiB).
_BEYOND_64_BITS = 2.0 ** 63


def _may_have_lost_digits(value) -> bool:
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, float) and abs(v) >= _BEYOND_64_BITS and v.is_integer():
            return True
    return False


def _loads(body: bytes):
    data = orjson.loads(body)
    if not _may_have_lost_digits(data):
        return data, orjson.dumps
    return json.loads(body.decode("utf-8")), _exact_dumps


def _exact_dumps(data: object) -> bytes:
    return json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode()


def rewrite_body(body: bytes, target: Target, endpoint: Endpoint = CHAT, client_stream: bool | None = None,
                 inspect: Callable[[dict[str, Any]], None] | None = None) -> Rewritten:
    """The body with `model` from the chosen config (replacing the client's) and `stream` where the
    config sets it, else `client_stream` where given (a retried attempt: the client's own, which
    the previous attempt's body may no longer hold), else as sent; every other field kept as
    sent. A streamed request also asks for the usage event (`stream_options.include_usage`), so
    its tokens can be counted; a stream turned off drops the `stream_options` a provider refuses
    without one. Raises GatewayError (400) for a body that is not a request for that endpoint
    (see `extproc.policy.openai_api`). `inspect`: called on the parsed body before it is rewritten
    (a data policy's check, which may refuse it or mask it in place); None for a route without
    one, which pays nothing more."""
    try:
        data, dumps = _loads(body)
    except (ValueError, RecursionError) as exc:  # orjson.JSONDecodeError and UnicodeDecodeError are ValueErrors
        reason = "invalid UTF-8" if "utf-8" in str(exc).lower() else "not valid JSON"
        raise GatewayError(400, f"request body is {reason}", "invalid_json") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "request body must be a JSON object", "invalid_body")
    check_body(endpoint, data)
    if inspect is not None:
        inspect(data)
    if "model" in data and not isinstance(data["model"], str):
        raise GatewayError(400, "'model' must be a string", "invalid_model")
    if "stream" in data and not isinstance(data["stream"], bool):
        raise GatewayError(400, "'stream' must be true or false", "invalid_stream")
    if endpoint.client_api != OPENAI_API or target.body_api != OPENAI_API:
        return _translated(data, dumps, target, endpoint, client_stream)
    model, config_stream = configured_model(endpoint, target), configured_stream(endpoint, target)
    if model is not None:
        data["model"] = model
    elif not data.get("model"):
        raise GatewayError(400, "'model' is required: the provider config names none", "missing_model")
    sent_stream = data.get("stream") is True
    options = data.get("stream_options")
    include_usage = sent_stream and isinstance(options, dict) and options.get("include_usage") is True
    if config_stream is None:
        config_stream = client_stream
    if config_stream is not None:
        data["stream"] = config_stream
    stream = endpoint.streams and data.get("stream") is True
    if stream:
        if options is None:
            data["stream_options"] = {"include_usage": True}
        elif not isinstance(options, dict):
            raise GatewayError(400, "'stream_options' must be an object", "invalid_stream_options")
        elif options.get("include_usage") is not True:
            options["include_usage"] = True
    elif endpoint.streams and sent_stream and options is not None:
        # the gateway turned the stream off: its options go too
        del data["stream_options"]
    return Rewritten(dumps(data), stream, data["model"], sent_stream, include_usage)


def _translated(data: dict, dumps, target: Target, endpoint: Endpoint, client_stream: bool | None) -> Rewritten:
    """A request whose client or provider speaks another API than OpenAI's: its body translated
    for the provider (with the config's model and `stream` where set, else the client's), and
    the path and headers that request needs."""
    serves(target, endpoint)
    model = configured_model(endpoint, target) or data.get("model")
    if not model:
        raise GatewayError(400, "'model' is required: the provider config names none", "missing_model")
    sent_stream = data.get("stream") is True
    stream = configured_stream(endpoint, target)
    if stream is None:
        stream = client_stream if client_stream is not None else sent_stream
    options = data.get("stream_options")
    include_usage = (sent_stream and endpoint.client_api == OPENAI_API and isinstance(options, dict)
                     and options.get("include_usage") is True)
    body = dumps(translate_request(endpoint.client_api, target, data, model, stream))
    path: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    if target.api in (GEMINI, BEDROCK):
        path = request_path(target, model, stream)
    if target.api == BEDROCK:
        headers = sign(target.api_settings or NO_SETTINGS, target.provider_host, path or "", body)
    return Rewritten(body, stream, model, sent_stream, include_usage, Own(path, headers))
