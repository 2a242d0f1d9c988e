"""Request body rewrite: the client's chat request turned into the provider's. Pure functions."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson

from ..errors import GatewayError
from ..policy.openai_api import CHAT, Endpoint, check_body, configured_model, configured_stream
from ..policy.table import Target


class Rewritten(NamedTuple):
    body: bytes
    stream: bool  # the provider is asked for server-sent events
    model: str  # the model the provider is asked for
    client_stream: bool = False  # the body asked for server-sent events (the client's own, on a first attempt)
    include_usage: bool = False  # ... and for the usage event (`stream_options.include_usage`)


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
