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

    def body(self) -> bytes:
        return error_body(self.status, self.message, self.code, self.kind)


def error_type(status: int) -> str:
    return _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")


def error_body(status: int, message: str, code: str, kind: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind or error_type(status), "code": code}})
