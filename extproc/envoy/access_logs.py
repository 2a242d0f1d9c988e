"""Envoy's access logs: one entry per request to the control plane (gRPC, batched: metrics,
budgets, passive health) and, optionally, one JSON line per request to a file."""

from __future__ import annotations

from ..protocol import ACCESS_LOG_CLUSTER, METADATA_NAMESPACE

# Envoy's time points of a streamed answer, for time to first token and per output token: the
# request's first byte, the provider's first body byte (its first event), its last byte.
STREAM_TIMINGS = {
    "ttft_us": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:us)%",
    "generation_us": "%COMMON_DURATION(US_RX_BODY_BEG:US_RX_END:us)%",
}


def metadata_value(key: str) -> str:
    return f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"


# One JSON line per request. The `llm_gateway` dynamic metadata comes from the ext_proc (route,
# rule, provider, request model, stream), from json_to_metadata (JSON answers) or sse_to_metadata
# (streamed answers): response model, tokens, an error event's type.
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(x-request-id)%",  # joins a request's line to its failed attempts' lines
    "method": "%REQ(:METHOD)%",
    "host": metadata_value("host"),
    "operation": metadata_value("operation"),
    "route": metadata_value("route"),
    "rule": metadata_value("rule"),
    "provider": metadata_value("provider"),
    "request_model": metadata_value("request_model"),
    "response_model": metadata_value("response_model"),
    "stream": metadata_value("stream"),
    "prompt_tokens": metadata_value("prompt_tokens"),
    "completion_tokens": metadata_value("completion_tokens"),
    "total_tokens": metadata_value("total_tokens"),
    "cached_tokens": metadata_value("cached_tokens"),
    "cost": metadata_value("cost"),  # nothing writes it: null, but on a priced answer's line (COST)
    "currency": metadata_value("currency"),
    "ttft_ms": metadata_value("ttft_ms"),  # nothing writes it: null on a JSON answer's line (see below)
    "generation_ms": metadata_value("generation_ms"),  # the same
    "stream_error": metadata_value("stream_error"),
    "budget": metadata_value("budget"),
    "budget_rule": metadata_value("budget_rule"),
    "budget_key": metadata_value("budget_key"),
    "budget_remaining_tokens": metadata_value("ratelimit_remaining_tokens"),
    # an LLMDataPolicy's deciding rule and its action (block, mask, log), and the detectors that
    # found something: names only, never what they found
    "data_policy": metadata_value("data_policy"),
    "data_rule": metadata_value("data_rule"),
    "data_action": metadata_value("data_action"),
    "data_detectors": metadata_value("data_detectors"),
    # the verified caller (extproc.policy.caller), never from the request: {namespace,
    # service_account, workload, pod}, one field (each field formatted costs every request)
    "caller": metadata_value("caller"),
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "tried": metadata_value("tried"),
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
    "trace_id": metadata_value("trace_id"),
}


def _usage(key: str) -> str:
    return f"('{key}' in M ? double(M['{key}']) : 0.0)"


# A priced answer's cost (docs/cost.md): the prompt's uncached tokens at the input price, its
# cached tokens at the cached price, the completion at the output price, prices per million
# tokens as the ext_proc wrote them for the attempt's provider and model. Envoy's CEL formats
# the double (small amounts in exponent form, e.g. 3e-07); the metrics and the spend report use
# the receiver's exact sum of the same terms (`extproc.policy.pricing.cost_of`).
COST = ("%CEL((" + f"({_usage('prompt_tokens')} - {_usage('cached_tokens')}) * double(M['price_input'])"
        f" + {_usage('cached_tokens')} * double(M['price_cached_input'])"
        f" + {_usage('completion_tokens')} * double(M['price_output'])"
        ") / 1000000.0)%").replace("M[", f"metadata.filter_metadata['{METADATA_NAMESPACE}'][").replace(
            "in M ", f"in metadata.filter_metadata['{METADATA_NAMESPACE}'] ")


def _priced(priced: bool) -> dict:
    """Whether the answer has a cost to log: a currency (its model has a price) and usage. Only
    those lines pay for the CEL expression; the others have `cost` null. Envoy's metadata filter
    cannot negate (it ignores a matcher's `invert`), so "not priced" is written out: no currency
    (absent or empty), or no usage (a string matcher never matches the number a present
    `prompt_tokens` holds)."""
    def matcher(key: str, value: dict, if_absent: bool) -> dict:
        return {"metadata_filter": {"matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": key}], "value": value},
                                    "match_if_key_not_found": if_absent}}

    if priced:
        return {"and_filter": {"filters": [
            matcher("currency", {"string_match": {"safe_regex": {"regex": ".+"}}}, False),
            matcher("prompt_tokens", {"present_match": True}, False)]}}
    return {"or_filter": {"filters": [
        matcher("currency", {"string_match": {"exact": ""}}, True),
        matcher("prompt_tokens", {"string_match": {"exact": "not a number"}}, True)]}}


def _streamed(streamed: bool) -> dict:
    """Whether the request asked for a streamed answer (the ext_proc's `stream` decision): a
    metadata filter, a lookup per line where a CEL expression on the answer's headers cost a few
    microseconds per request (measured with scripts/bench). Envoy's metadata filter ignores the
    matcher's `invert`: the two filters test for true and for false; no decision at all (a
    request the ext_proc refused) counts as not streamed."""
    return {"metadata_filter": {
        "matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": "stream"}], "value": {"bool_match": streamed}},
        "match_if_key_not_found": not streamed}}


# A streamed request's line: time to first token from Envoy's time points (whole milliseconds),
# and the time from the first to the last byte of the answer (time per output token is that over
# the output tokens after the first; the metrics compute it).
STREAM_ACCESS_LOG_FORMAT = {
    **ACCESS_LOG_FORMAT,
    "ttft_ms": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%",
    "generation_ms": "%COMMON_DURATION(US_RX_BODY_BEG:US_RX_END:ms)%",
}


def _file_log(path: str, fmt: dict, streamed: bool, priced: bool) -> dict:
    if priced:
        fmt = {**fmt, "cost": COST}
    return {"name": "envoy.access_loggers.file",
            "filter": {"and_filter": {"filters": [_streamed(streamed), _priced(priced)]}},
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": path, "log_format": {"json_format": fmt}}}


def access_logs(path: str | None) -> list[dict]:
    """The request logs: to the control plane, and to `path` when there is one."""
    logs = [grpc_access_log()]
    if path:
        # one line per request either way; a streamed request's line has its timings, a priced
        # answer's its cost
        for streamed in (False, True):
            fmt = STREAM_ACCESS_LOG_FORMAT if streamed else ACCESS_LOG_FORMAT
            for priced in (False, True):
                logs.append(_file_log(path, fmt, streamed, priced))
    return logs


def grpc_access_log() -> dict:
    return {
        # to the control plane, batched, for the Prometheus metrics
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {"log_name": "llm_gateway", "transport_api_version": "V3",
                              "grpc_service": {"envoy_grpc": {"cluster_name": ACCESS_LOG_CLUSTER}},
                              "buffer_flush_interval": "0.5s",
                              # a streamed answer's time points, read by the receiver
                              "custom_tags": [{"tag": tag, "value": value} for tag, value in STREAM_TIMINGS.items()]},
            "additional_response_headers_to_log": ["content-type"],
        },
    }
