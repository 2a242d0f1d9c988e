"""Envoy's access log, streamed to this process (gRPC access log service), as metrics.

Envoy batches finished requests into few messages, so metrics cost no extra round trip per
request; the stream arrives on the lean HTTP/2 server, beside the ext_proc. Each entry carries
what the ext_proc decided and what the answer said, as dynamic metadata in the `llm_gateway`
namespace: usage and model from Envoy's json_to_metadata filter for JSON answers, from the
ext_proc's event-stream reader for streamed ones.
"""

from __future__ import annotations

import logging

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from .metrics import GatewayMetrics, RequestRecord

UPSTREAM_END = accesslog_pb2.AccessLogType.Value("UpstreamEnd")
from .names import METADATA_NAMESPACE

log = logging.getLogger("extproc.accesslog")

GATEWAY_DETAILS_PREFIX = "llm_gateway_"


def record_from_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> RequestRecord:
    common = entry.common_properties
    meta = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    fields = meta.fields if meta is not None else {}

    def text(key: str) -> str:
        value = fields.get(key)
        return value.string_value if value is not None else ""

    def number(key: str) -> float | None:
        value = fields.get(key)
        if value is None:
            return None
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return value.number_value
        if kind == "string_value":
            try:
                return float(value.string_value)
            except ValueError:
                return None
        return None

    def tokens(key: str) -> int | None:
        n = number(key)
        return int(n) if n is not None else None

    status = entry.response.response_code.value
    details = entry.response.response_code_details
    stream_error = text("stream_error")
    if details.startswith(GATEWAY_DETAILS_PREFIX):
        outcome = "rejected" if status < 500 else "gateway_error"
        error_type = details[len(GATEWAY_DETAILS_PREFIX):]
    elif details == "via_upstream":
        if status >= 400:
            outcome, error_type = "provider_error", str(status)
        elif stream_error:
            outcome, error_type = "provider_error", stream_error
        else:
            outcome, error_type = "success", ""
    elif status == 0:  # no answer at all: the client went away first
        outcome, error_type = "client_cancelled", details.split("{", 1)[0][:64] or "client_disconnected"
    else:  # Envoy's own answer (no upstream, TLS failure, body too large, ext_proc down), or an
        # answer cut after it started (Envoy keeps the upstream's status and logs its own reason)
        error_type = details.split("{", 1)[0][:64] or str(status)
        if 400 <= status < 500:
            outcome = "rejected"
        elif status < 400 and details.startswith("upstream_"):
            outcome = "provider_error"
        else:
            outcome = "gateway_error"

    duration = common.time_to_last_downstream_tx_byte if common.HasField("time_to_last_downstream_tx_byte") else common.duration
    ttft_ms, tpot_ms = number("ttft_ms"), number("tpot_ms")
    stream = fields.get("stream")
    return RequestRecord(
        route=text("route"), rule=text("rule"), provider=text("provider"), provider_host=text("provider_host"),
        request_model=text("request_model"), response_model=text("response_model"),
        stream=bool(stream.bool_value) if stream is not None else False,
        status=status, outcome=outcome, error_type=error_type,
        duration_s=duration.ToNanoseconds() / 1e9 if duration.ByteSize() else None,
        prompt_tokens=tokens("prompt_tokens"), completion_tokens=tokens("completion_tokens"),
        ttft_s=ttft_ms / 1000 if ttft_ms is not None else None,
        tpot_s=tpot_ms / 1000 if tpot_ms is not None else None,
    )


STREAM_ACCESS_LOGS = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"


class AccessLogReceiver:
    """`StreamAccessLogs`: a client stream of batches, one empty answer when Envoy closes it."""

    def __init__(self, metrics: GatewayMetrics, failover=None):
        self._metrics = metrics
        self._failover = failover  # extproc.failover_log.FailoverObserver: attempts, passive health

    def call(self) -> "AccessLogReceiver":
        return self  # no state per stream

    def on_message(self, data: bytes) -> tuple[bytes | None, bool]:
        for entry in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry:
            try:
                if self._failover is not None:
                    self._failover.observe(entry)
                if entry.common_properties.access_log_type != UPSTREAM_END:  # attempts are not requests
                    self._metrics.observe(record_from_entry(entry))
            except Exception:  # one odd entry must not stop the stream
                log.exception("cannot record an access log entry")
        return None, False

    def on_client_end(self) -> bytes:
        return als_pb2.StreamAccessLogsResponse().SerializeToString()
