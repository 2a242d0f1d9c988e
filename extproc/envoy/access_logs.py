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
    "ttft_ms": metadata_value("ttft_ms"),  # nothing writes it: null on a JSON answer's line (see below)
    "generation_ms": metadata_value("generation_ms"),  # the same
    "stream_error": metadata_value("stream_error"),
    "budget": metadata_value("budget"),
    "budget_rule": metadata_value("budget_rule"),
    "budget_key": metadata_value("budget_key"),
    "budget_remaining_tokens": metadata_value("ratelimit_remaining_tokens"),
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
}


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


def _file_log(path: str, fmt: dict, streamed: bool) -> dict:
    return {"name": "envoy.access_loggers.file", "filter": _streamed(streamed),
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": path, "log_format": {"json_format": fmt}}}


def access_logs(path: str | None) -> list[dict]:
    """The request logs: to the control plane, and to `path` when there is one."""
    logs = [grpc_access_log()]
    if path:
        # one line per request either way; a streamed request's line has its timings
        logs.append(_file_log(path, ACCESS_LOG_FORMAT, streamed=False))
        logs.append(_file_log(path, STREAM_ACCESS_LOG_FORMAT, streamed=True))
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
