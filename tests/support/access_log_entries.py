"""Envoy's gRPC access log entries as the gateway's Envoy writes them: a decision's metadata in the
gateway's namespace, the answer's status and details, and its timings."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2

HOST = "dashscope.aliyuncs.com"
DECISION = {"route": "llm-route", "rule": "subscriber", "provider": "dashscope", "provider_host": HOST,
            "request_model": "qwen-turbo"}
LABELS = dict(route="llm-route", rule="subscriber", provider="dashscope", provider_host=HOST,
              request_model="qwen-turbo")


def entry(status: int | None = 200, details: str = "via_upstream", meta: dict | None = None,
          last_tx_ms: int | None = None, duration_ms: int | None = None) -> accesslog_pb2.HTTPAccessLogEntry:
    e = accesslog_pb2.HTTPAccessLogEntry()
    if status is not None:
        e.response.response_code.value = status
    e.response.response_code_details = details
    if meta is not None:
        e.common_properties.metadata.filter_metadata["llm_gateway"].update(meta)
    if last_tx_ms is not None:
        e.common_properties.time_to_last_downstream_tx_byte.FromMilliseconds(last_tx_ms)
    if duration_ms is not None:
        e.common_properties.duration.FromMilliseconds(duration_ms)
    return e
