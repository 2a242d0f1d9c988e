"""Envoy's own error answers (no upstream, TLS failure, body too large, ext_proc down, a limit
of requests in flight reached), in the same OpenAI-style JSON as the ext_proc's (`extproc.errors`)."""

from __future__ import annotations

from ..errors import (
    ADDRESS_UNKNOWN,
    LOCAL_REPLIES,
    OVERLOADED_CODE,
    OVERLOADED_HEADERS,
    OVERLOADED_MESSAGE,
    OVERLOADED_TYPE,
    error_type,
    too_large_message,
)
from ..protocol import DEFAULT_BODY_LIMIT, EXT_PROC_OVERFLOW_DETAILS, GATEWAY_DETAILS_PREFIX

# A circuit breaker of the ext_proc cluster refused the request's ext_proc stream
EXT_PROC_OVERFLOW = (f"response.code_details.startsWith('{EXT_PROC_OVERFLOW_DETAILS[0]}') && "
                     f"response.code_details.contains('{EXT_PROC_OVERFLOW_DETAILS[1]}')")


def local_reply_config(body_timeout_s: float, body_limit: int = DEFAULT_BODY_LIMIT) -> dict:
    """Envoy's own error answers (no upstream, TLS failure, body too large, ext_proc down, a limit
    of requests in flight reached) in the same OpenAI-style JSON as the ext_proc's. The ext_proc's
    own answers pass through as they are."""
    def json_body(status: int, code: str, message: str, kind: str | None = None, details: bool = True) -> dict:
        text = f"{message} (%RESPONSE_CODE_DETAILS%)" if details else message
        return {"json_format": {"error": {"message": text, "type": kind or error_type(status), "code": code}},
                "content_type": "application/json"}

    def status_is(code: int) -> dict:
        value = {"default_value": code, "runtime_key": f"llm_gateway.local_reply.{code}"}
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": value}}}

    def cel(expression: str) -> dict:
        return {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                "expression": expression}}}

    def details_start(prefix: str) -> dict:
        return cel(f"response.code_details.startsWith('{prefix}')")

    mappers = [{
        # Answers the ext_proc made itself: their body is already the JSON error.
        "filter": details_start(GATEWAY_DETAILS_PREFIX),
        "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                                 "content_type": "application/json"},
    }, {
        # The ext_proc answers a request's headers once its body is whole: a timeout there is a
        # body that did not arrive in time (Envoy would say 504, as if the provider were slow).
        "filter": details_start("ext_proc_error_per-message_timeout"),
        "status_code": 408,
        "body_format_override": json_body(
            408, "request_timeout", f"the request body did not arrive within {body_timeout_s:g} s of its headers"),
    }, {
        # No host in the provider's cluster: its name has not resolved (yet); see
        # `extproc.envoy.clusters.resolving`. Envoy does not retry this, so failover leaves such
        # providers out of attempt orders (`extproc.policy.addresses`).
        "filter": {"response_flag_filter": {"flags": ["UH"]}},
        "body_format_override": json_body(503, *ADDRESS_UNKNOWN, kind="server_error"),
    }, {
        # A limit of requests in flight (circuit breakers, extproc.policy.capacity): a provider's
        # cluster (Envoy's UO flag, otherwise a 503 like an unreachable provider) or the ext_proc's
        # (otherwise a 500 with Envoy's internal reason). A retryable refusal, in one wording.
        "filter": {"or_filter": {"filters": [{"response_flag_filter": {"flags": ["UO"]}}, cel(EXT_PROC_OVERFLOW)]}},
        "status_code": 503,
        "headers_to_add": [{"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                           for name, value in OVERLOADED_HEADERS],
        "body_format_override": json_body(503, OVERLOADED_CODE, OVERLOADED_MESSAGE, OVERLOADED_TYPE, details=False),
    }]
    for status, (code, message) in LOCAL_REPLIES.items():
        if status == 413:  # the limit, and the flag that sets it
            message = too_large_message(body_limit)
        mappers.append({"filter": status_is(status), "body_format_override": json_body(status, code, message)})
    return {"mappers": mappers, "body_format": json_body(500, "gateway_error", "the gateway could not answer")}
