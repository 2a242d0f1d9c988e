"""The OpenAI-style error body of the gateway's own answers, and its error type by status."""

from __future__ import annotations

import orjson
import pytest

from extproc.errors import GatewayError, error_body, error_type


@pytest.mark.parametrize(("status", "type_"), [
    pytest.param(400, "invalid_request_error", id="400"),
    pytest.param(404, "invalid_request_error", id="404"),
    pytest.param(405, "invalid_request_error", id="405"),
    pytest.param(413, "invalid_request_error", id="413"),
    pytest.param(429, "invalid_request_error", id="429-unlisted-client-error"),
    pytest.param(500, "server_error", id="500"),
    pytest.param(502, "upstream_error", id="502"),
    pytest.param(503, "upstream_error", id="503"),
    pytest.param(504, "upstream_error", id="504"),
    pytest.param(501, "server_error", id="501-unlisted-server-error"),
])
def test_error_body_shape(status, type_):
    body = error_body(status, "what went wrong: \"quoted\"", "some_code")
    parsed = orjson.loads(body)
    assert parsed == {"error": {"message": "what went wrong: \"quoted\"", "type": type_, "code": "some_code"}}
    assert error_type(status) == type_


def test_gateway_error_body_matches_error_body():
    err = GatewayError(404, "no route", "unknown_host")
    assert err.body() == error_body(404, "no route", "unknown_host")
    assert orjson.loads(err.body())["error"]["code"] == "unknown_host"


def test_the_gateways_own_503s_are_server_errors():
    """No provider was involved: clients that retry on `upstream_error` should not blame one."""
    import orjson

    from extproc.policy.body_memory import Overloaded
    from extproc.policy.budgets import budget_unavailable

    for error in (Overloaded(10, 5), budget_unavailable()):
        assert error.status == 503 and orjson.loads(error.body())["error"]["type"] == "server_error"
    assert orjson.loads(GatewayError(503, "x", "y").body())["error"]["type"] == "upstream_error"
