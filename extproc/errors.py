"""OpenAI-style error answers, the shape every client of an OpenAI-compatible API already parses."""

from __future__ import annotations

import orjson

_TYPES = {
    400: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    502: "upstream_error",
    503: "upstream_error",
    504: "upstream_error",
}


class GatewayError(Exception):
    """A request the gateway answers itself, with a status and an OpenAI-style JSON body."""

    def __init__(self, status: int, message: str, code: str, kind: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        # the OpenAI `type`; by status unless given (the gateway's own 503s are `server_error`:
        # no provider was involved)
        self.kind = kind or error_type(status)

    # extra answer headers (a 429's Retry-After and x-ratelimit-*, a 503's Retry-After)
    headers: tuple[tuple[str, str], ...] = ()
    # the OpenAI operation a refused request was for, where no decision names it (metrics' label)
    operation: str | None = None
    # entries of the `llm_gateway` metadata for the access log (a refusing data policy's rule)
    metadata: tuple[tuple[str, str], ...] = ()

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code, self.kind)


# The gateway at one of its limits (body bytes held, requests in flight): a 503 to retry soon,
# with the same code, type and Retry-After whichever limit refused (the ext_proc's body memory,
# `extproc.policy.body_memory`, or Envoy's circuit breakers, `extproc.envoy.local_replies`).
OVERLOADED_CODE = "overloaded"
OVERLOADED_TYPE = "server_error"  # no provider was involved
RETRY_AFTER_S = 1
# Envoy's refusal at a limit of requests in flight (its circuit breakers)
OVERLOADED_MESSAGE = "the gateway is at its limit of requests in flight; retry in a moment"
OVERLOADED_HEADERS = (("retry-after", str(RETRY_AFTER_S)),)


# Envoy's own answers, by status: (error code, message). Envoy's reason is added to the message
# (see `extproc.envoy.local_replies`); a 413, the ext_proc's or Envoy's, says the limit (`too_large_message`).
LOCAL_REPLIES = {
    400: ("bad_request", "the request is not valid HTTP"),
    404: ("not_found", "no route for this request"),
    413: ("request_too_large", "the request body is larger than the gateway accepts"),
    431: ("headers_too_large", "the request headers are larger than the gateway accepts"),
    500: ("gateway_error", "the gateway could not process the request"),
    502: ("bad_upstream_response", "the provider's answer could not be read"),
    503: ("upstream_unavailable", "the provider could not be reached over verified TLS"),
    504: ("upstream_timeout", "the provider did not answer in time"),
}


def too_large_message(limit: int) -> str:
    """A 413's words, the ext_proc's and Envoy's alike: the limit, and the flag that sets it."""
    return f"{LOCAL_REPLIES[413][1]}: its limit is {limit} bytes (set with --body-limit)"
# Envoy's 503 for a provider cluster without an address: its host name has not resolved (yet).
# `server_error`: no provider was reached, as for the gateway's own 503s.
ADDRESS_UNKNOWN = ("provider_address_unknown", "the address of provider %REQ(:AUTHORITY)% is unknown: its host name "
                   "does not resolve (yet); the gateway keeps asking and serves it as soon as it does")


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, code: str, kind: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind or error_type(status), "code": code}})
