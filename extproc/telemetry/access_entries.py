"""What a finished request's access-log entry says, as a `RequestRecord` for the metrics.

Each entry carries what the ext_proc decided and what the answer said, as dynamic metadata in
the `llm_gateway` namespace: usage and model from Envoy's json_to_metadata filter for JSON
answers, from its sse_to_metadata filter for streamed ones. A streamed answer's time to first
token and time per output token come from Envoy's time points, sent as custom tags (see
`stream_timings`).
"""

from __future__ import annotations

from collections.abc import Mapping

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import struct_pb2

from ..errors import ADDRESS_UNKNOWN, OVERLOADED_CODE
from ..protocol import EXT_PROC_OVERFLOW_DETAILS, GATEWAY_DETAILS_PREFIX, METADATA_NAMESPACE
from .metrics import RequestRecord

CLIENT_GONE_DETAILS = "downstream_remote_disconnect"


def _micros(text: str | None) -> int | None:
    """A time point difference as Envoy formats it: whole microseconds, or `-`/empty if unknown."""
    return int(text) if text and text.isdigit() else None


def stream_timings(content_type: str, tags: Mapping[str, str], completion_tokens: int | None
                   ) -> tuple[float | None, float | None]:
    """Time to first token and per output token (seconds) of a streamed answer, from Envoy's time
    points: the first token is the provider's first body byte (its first event) after the
    request's first byte; the time per output token is the time from that first byte to the
    answer's last byte over the output tokens after the first. None for answers that are not
    event streams, and where a point is missing (no answer body)."""
    if not content_type.lower().startswith("text/event-stream"):
        return None, None
    ttft_us, generation_us = _micros(tags.get("ttft_us")), _micros(tags.get("generation_us"))
    ttft = ttft_us / 1e6 if ttft_us is not None else None
    tpot = None
    if ttft is not None and generation_us is not None and completion_tokens and completion_tokens > 1:
        tpot = generation_us / 1e6 / (completion_tokens - 1)
    return ttft, tpot


def _client_went_away(details: str, flags: accesslog_pb2.ResponseFlags) -> bool:
    """The client hung up before the answer was whole: Envoy's DC flag or its reason."""
    gone: bool = flags.downstream_connection_termination
    return gone or details.startswith(CLIENT_GONE_DETAILS)


def refused_at_a_limit(details: str, flags: accesslog_pb2.ResponseFlags) -> bool:
    """A circuit breaker refused the request (a limit of requests in flight, extproc.policy.capacity):
    a provider cluster's (Envoy's UO flag) or the ext_proc cluster's (its reason names the overflow)."""
    started, named = EXT_PROC_OVERFLOW_DETAILS
    overflow: bool = flags.upstream_overflow
    return overflow or (details.startswith(started) and named in details)


def outcome_of(status: int, details: str, stream_error: str, flags: accesslog_pb2.ResponseFlags) -> tuple[str, str]:
    """(outcome, error type) of a finished request, from its status, Envoy's reason for it
    (`response_code_details`), an error event seen in its stream and Envoy's response flags."""
    if details == "via_upstream" and not flags.downstream_connection_termination:  # most requests
        if status >= 400:
            return "provider_error", str(status)
        return ("provider_error", stream_error) if stream_error else ("success", "")
    if details.startswith(GATEWAY_DETAILS_PREFIX) and status < 400:  # answered by the gateway: the model list
        return "success", ""
    if details.startswith(GATEWAY_DETAILS_PREFIX):
        return "rejected" if status < 500 else "gateway_error", details[len(GATEWAY_DETAILS_PREFIX):]
    if _client_went_away(details, flags):
        reason = details.split("{", 1)[0][:64]
        return "client_cancelled", reason if reason.startswith("downstream_") else CLIENT_GONE_DETAILS
    if status == 0:  # no answer at all: the client went away first
        return "client_cancelled", details.split("{", 1)[0][:64] or "client_disconnected"
    if refused_at_a_limit(details, flags):  # counted with the ext_proc's own 503s of the same code
        return "gateway_error", OVERLOADED_CODE
    # Envoy's own answer (no upstream, TLS failure, body too large, ext_proc down), or an answer
    # cut after it started (Envoy keeps the upstream's status and logs its own reason)
    if flags.no_healthy_upstream:  # no address for the provider yet (extproc.envoy.local_replies)
        return "gateway_error", ADDRESS_UNKNOWN[0]
    error_type = details.split("{", 1)[0][:64] or str(status)
    if 400 <= status < 500:
        return "rejected", error_type
    if status < 400 and details.startswith("upstream_"):
        return "provider_error", error_type
    return "gateway_error", error_type


_NO_FIELDS: dict[str, struct_pb2.Value] = {}


def _text(value: struct_pb2.Value | None) -> str:
    text: str = value.string_value if value is not None else ""
    return text


def metadata_number(value: struct_pb2.Value | None) -> float | None:
    """A metadata number: json_to_metadata and sse_to_metadata write numbers; a reader that
    writes them as text is read too. None where it is absent or not a number."""
    if value is None:
        return None
    number: float = value.number_value
    if number:  # the common case, without asking which kind the value is (a costly call here)
        return number
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        return number
    if kind == "string_value":
        try:
            return float(value.string_value)
        except ValueError:
            return None
    return None


def _tokens(value: struct_pb2.Value | None) -> int | None:
    number = metadata_number(value)
    return int(number) if number is not None else None


def record_from_entry(entry: accesslog_pb2.HTTPAccessLogEntry) -> RequestRecord:
    """The metrics' view of a finished request. On the path of every request (a few µs): each
    field read from a protobuf message costs a few tenths of a microsecond, so each is read once,
    and what only some requests have (a streamed answer's timings) only for them. The record is
    built positionally, in RequestRecord's field order."""
    common = entry.common_properties
    meta = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
    get = meta.fields.get if meta is not None else _NO_FIELDS.get
    response = entry.response
    status = response.response_code.value
    outcome, error_type = outcome_of(status, response.response_code_details, _text(get("stream_error")),
                                     common.response_flags)
    # to the answer's last byte, else (no byte sent) the whole duration; read field by field: HasField,
    # ByteSize and ToNanoseconds cost 0.7 µs more per entry (scripts/bench_work.py)
    last = common.time_to_last_downstream_tx_byte
    seconds, nanos = last.seconds, last.nanos
    if not (seconds or nanos):
        whole = common.duration
        seconds, nanos = whole.seconds, whole.nanos
    completion_tokens = _tokens(get("completion_tokens"))
    stream = get("stream")
    stream = stream.bool_value if stream is not None else False
    ttft_s = tpot_s = None
    if stream:  # a request that asked for a stream (its answer may still be JSON: an error)
        ttft_s, tpot_s = stream_timings(response.response_headers.get("content-type", ""),
                                        common.custom_tags, completion_tokens)
    return RequestRecord(
        _text(get("route")), _text(get("rule")), _text(get("provider")), _text(get("provider_host")),
        _text(get("request_model")), _text(get("response_model")), stream, status, outcome, error_type,
        (seconds * 1_000_000_000 + nanos) / 1e9 if seconds or nanos else None,
        _tokens(get("prompt_tokens")), completion_tokens, ttft_s, tpot_s, _text(get("operation")) or "chat")
    # the price (currency, cached tokens) and the budget key are read by the receiver, where configured
