"""Envoy's gRPC access log entries turned into request records, and streamed into the metrics."""

from __future__ import annotations


import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from extproc.dataplane.accesslog_receiver import AccessLogReceiver
from extproc.telemetry.access_entries import record_from_entry
from extproc.telemetry.metrics import GatewayMetrics, RequestRecord

HOST = "dashscope.aliyuncs.com"
DECISION = {"route": "llm-route", "rule": "subscriber", "provider": "dashscope", "provider_host": HOST,
            "request_model": "qwen-turbo"}
LABELS = dict(route="llm-route", rule="subscriber", provider="dashscope", provider_host=HOST, request_model="qwen-turbo")


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


@pytest.mark.parametrize(("log_entry", "expected"), [
    pytest.param(
        entry(200, meta={**DECISION, "response_model": "qwen-turbo-2024-09-19", "prompt_tokens": 12,
                         "completion_tokens": 30, "total_tokens": 42, "stream": True, "host": "llm.example"},
              last_tx_ms=1500),
        RequestRecord(**LABELS, response_model="qwen-turbo-2024-09-19", stream=True, status=200, outcome="success",
                      error_type="", duration_s=1.5, prompt_tokens=12, completion_tokens=30),
        id="success-stream"),
    pytest.param(
        entry(200, meta={**DECISION, "response_model": "qwen-turbo", "prompt_tokens": 7, "completion_tokens": 1,
                         "stream": False}, last_tx_ms=80),
        RequestRecord(**LABELS, response_model="qwen-turbo", stream=False, status=200, outcome="success",
                      duration_s=0.08, prompt_tokens=7, completion_tokens=1),
        id="success-json-no-ttft"),
    pytest.param(
        entry(200, meta={**DECISION, "prompt_tokens": "12", "completion_tokens": "x"}),
        RequestRecord(**LABELS, status=200, outcome="success", prompt_tokens=12),
        id="numbers-as-strings"),
    pytest.param(
        entry(200, meta={**DECISION, "prompt_tokens": 0, "completion_tokens": "0"}),
        RequestRecord(**LABELS, status=200, outcome="success", prompt_tokens=0, completion_tokens=0),
        id="zero-tokens-are-zero-not-unknown"),
    pytest.param(
        entry(200, meta={**DECISION, "prompt_tokens": True, "completion_tokens": None}),
        RequestRecord(**LABELS, status=200, outcome="success"),
        id="tokens-of-other-kinds-ignored"),
    pytest.param(
        entry(200, meta=DECISION, duration_ms=2000),
        RequestRecord(**LABELS, status=200, outcome="success", duration_s=2.0),
        id="duration-when-no-last-tx-byte"),
    pytest.param(
        entry(200, meta=DECISION, last_tx_ms=300, duration_ms=2000),
        RequestRecord(**LABELS, status=200, outcome="success", duration_s=0.3),
        id="last-tx-byte-preferred-to-duration"),
    pytest.param(
        entry(429, meta={**DECISION, "stream": True}, last_tx_ms=40),
        RequestRecord(**LABELS, stream=True, status=429, outcome="provider_error", error_type="429", duration_s=0.04),
        id="provider-429"),
    pytest.param(
        entry(500, meta=DECISION),
        RequestRecord(**LABELS, status=500, outcome="provider_error", error_type="500"),
        id="provider-500"),
    pytest.param(
        entry(429, meta={**DECISION, "stream_error": "server_error"}),
        RequestRecord(**LABELS, status=429, outcome="provider_error", error_type="429"),
        id="provider-status-wins-over-stream-error"),
    pytest.param(
        entry(200, meta={**DECISION, "stream": True, "stream_error": "server_error", "prompt_tokens": 3}),
        RequestRecord(**LABELS, stream=True, status=200, outcome="provider_error", error_type="server_error",
                      prompt_tokens=3),
        id="stream-error-in-200"),
    pytest.param(
        entry(400, "llm_gateway_invalid_json"),
        RequestRecord(status=400, outcome="rejected", error_type="invalid_json"),
        id="ext-proc-rejected"),
    pytest.param(
        entry(404, "llm_gateway_no_matching_rule", meta={"route": "llm-route"}),
        RequestRecord(route="llm-route", status=404, outcome="rejected", error_type="no_matching_rule"),
        id="ext-proc-rejected-with-some-metadata"),
    pytest.param(
        entry(500, "llm_gateway_internal_error"),
        RequestRecord(status=500, outcome="gateway_error", error_type="internal_error"),
        id="ext-proc-internal-error"),
    pytest.param(
        entry(503, "upstream_reset_before_response_started{remote_connection_failure|TLS_error}", meta=DECISION,
              last_tx_ms=12),
        RequestRecord(**LABELS, status=503, outcome="gateway_error", error_type="upstream_reset_before_response_started",
                      duration_s=0.012),
        id="envoy-local-503-braces-dropped"),
    pytest.param(
        entry(413, "request_payload_too_large"),
        RequestRecord(status=413, outcome="rejected", error_type="request_payload_too_large"),
        id="envoy-local-413"),
    pytest.param(
        entry(503, "x" * 100 + "{detail}"),
        RequestRecord(status=503, outcome="gateway_error", error_type="x" * 64),
        id="envoy-local-details-bounded"),
    pytest.param(
        entry(503, ""),
        RequestRecord(status=503, outcome="gateway_error", error_type="503"),
        id="envoy-local-no-details"),
    pytest.param(
        entry(200),
        RequestRecord(status=200, outcome="success"),
        id="no-metadata"),
])
def test_record_from_entry(log_entry, expected: RequestRecord):
    assert record_from_entry(log_entry) == expected


@pytest.mark.parametrize(("details", "error_type"), [
    pytest.param("upstream_reset_after_response_started{connection_termination}",
                 "upstream_reset_after_response_started", id="provider-cut-the-stream"),
    pytest.param("response_timeout", "response_timeout", id="route-timeout-mid-stream"),
])
def test_answer_cut_after_it_started_is_not_a_rejection(details: str, error_type: str):
    """Envoy keeps the upstream's 200 when it resets an answer already under way, and logs its own
    details (router.cc LateUpstreamReset / response timeout via sendLocalReply, which only resets
    the stream once headers were sent). A streamed answer cut midway is an error, not a request
    the gateway refused."""
    rec = record_from_entry(entry(200, details, meta={**DECISION, "stream": True}, last_tx_ms=30000))
    assert rec.error_type == error_type
    assert rec.outcome in ("provider_error", "gateway_error"), rec.outcome


def test_no_metadata_has_empty_labels_and_no_tokens():
    rec = record_from_entry(entry(200))
    assert (rec.route, rec.rule, rec.provider, rec.provider_host, rec.request_model, rec.response_model) == ("",) * 6
    assert rec.prompt_tokens is None and rec.completion_tokens is None
    assert rec.ttft_s is None and rec.tpot_s is None and rec.duration_s is None


def test_other_namespaces_are_not_read():
    e = entry(200)
    e.common_properties.metadata.filter_metadata["envoy.filters.http.ext_proc"].update({"route": "other"})
    assert record_from_entry(e) == RequestRecord(status=200, outcome="success")


def requests_total(metrics: GatewayMetrics, outcome: str, error_type: str = "", response_model: str = "",
                   decision: dict = DECISION) -> float | None:
    return metrics.registry.get_sample_value("llm_gateway_requests_total", {
        "gen_ai_operation_name": "chat", "gen_ai_provider_name": decision.get("provider_host", ""),
        "gen_ai_request_model": decision.get("request_model", ""), "gen_ai_response_model": response_model,
        "llm_route": decision.get("route", ""), "llm_rule": decision.get("rule", ""),
        "llm_provider": decision.get("provider", ""), "outcome": outcome, "error_type": error_type})


def token_sample(metrics: GatewayMetrics, suffix: str, token_type: str, response_model: str) -> float | None:
    return metrics.registry.get_sample_value(f"gen_ai_client_token_usage_{suffix}", {
        "gen_ai_operation_name": "chat", "gen_ai_provider_name": HOST, "gen_ai_request_model": "qwen-turbo",
        "gen_ai_response_model": response_model, "llm_route": "llm-route", "llm_rule": "subscriber",
        "llm_provider": "dashscope", "gen_ai_token_type": token_type})


def stream_logs(receiver: AccessLogReceiver, *messages: als_pb2.StreamAccessLogsMessage):
    """One access log stream in wire form; the answer sent when Envoy closes it."""
    call = receiver.call()
    for m in messages:
        assert call.on_message(m.SerializeToString()) == (None, False)
    return als_pb2.StreamAccessLogsResponse.FromString(call.on_client_end())


def message(*entries: accesslog_pb2.HTTPAccessLogEntry, first: bool = False) -> als_pb2.StreamAccessLogsMessage:
    m = als_pb2.StreamAccessLogsMessage()
    if first:
        m.identifier.log_name = "llm_gateway"
        m.identifier.node.id = "envoy"
    m.http_logs.log_entry.extend(entries)
    return m


def test_receiver_streams_entries_into_metrics():
    metrics = GatewayMetrics()
    ok = {**DECISION, "response_model": "qwen-turbo-0919", "prompt_tokens": 10, "completion_tokens": 20}
    answer = stream_logs(
        AccessLogReceiver(metrics),
        message(entry(200, meta=ok, last_tx_ms=100), entry(429, meta=DECISION, last_tx_ms=50),
                entry(200, meta={**ok, "prompt_tokens": 5, "completion_tokens": 1}), first=True),
        message(entry(400, "llm_gateway_invalid_json"), entry(200, meta=ok)),
    )
    assert isinstance(answer, als_pb2.StreamAccessLogsResponse)
    assert requests_total(metrics, "success", response_model="qwen-turbo-0919") == 3
    assert requests_total(metrics, "provider_error", "429") == 1
    assert requests_total(metrics, "rejected", "invalid_json", decision={}) == 1
    assert requests_total(metrics, "success") is None  # the success samples all carry the response model
    assert token_sample(metrics, "sum", "input", "qwen-turbo-0919") == 25
    assert token_sample(metrics, "count", "input", "qwen-turbo-0919") == 3
    assert token_sample(metrics, "sum", "output", "qwen-turbo-0919") == 41
    assert metrics.registry.get_sample_value("gen_ai_server_request_duration_seconds_count", {
        "gen_ai_operation_name": "chat", "gen_ai_provider_name": HOST, "gen_ai_request_model": "qwen-turbo",
        "gen_ai_response_model": "qwen-turbo-0919", "llm_route": "llm-route", "llm_rule": "subscriber",
        "llm_provider": "dashscope", "error_type": ""}) == 1  # only the first success has a duration


def test_receiver_survives_an_entry_it_cannot_record():
    class Flaky(GatewayMetrics):
        def observe(self, rec: RequestRecord) -> None:
            if rec.route == "boom":
                raise RuntimeError("boom")
            super().observe(rec)

    metrics = Flaky()
    stream_logs(AccessLogReceiver(metrics),
                message(entry(200, meta=DECISION), entry(200, meta={"route": "boom"}), entry(200, meta=DECISION)),
                message(entry(200, meta=DECISION)))
    assert requests_total(metrics, "success") == 3


def test_receiver_with_no_messages():
    metrics = GatewayMetrics()
    assert isinstance(stream_logs(AccessLogReceiver(metrics)), als_pb2.StreamAccessLogsResponse)
    assert requests_total(metrics, "success") is None


@pytest.mark.parametrize(("details", "error_type"), [
    pytest.param("downstream_remote_disconnect", "downstream_remote_disconnect", id="client-went-away"),
    pytest.param("", "client_disconnected", id="no-details"),
])
def test_no_answer_because_the_client_left_is_cancelled(details: str, error_type: str):
    rec = record_from_entry(entry(None, details, meta=DECISION))
    assert (rec.outcome, rec.error_type) == ("client_cancelled", error_type)


def timed(content_type: str | None, tags: dict[str, str], meta: dict | None = None,
          status: int = 200) -> accesslog_pb2.HTTPAccessLogEntry:
    """An entry as the gRPC access log sends it: the answer's content type, the time-point tags."""
    e = entry(status, meta={**DECISION, "stream": True, **(meta or {})})
    if content_type is not None:
        e.response.response_headers["content-type"] = content_type
    for tag, value in tags.items():
        e.common_properties.custom_tags[tag] = value
    return e


@pytest.mark.parametrize(("log_entry", "ttft_s", "tpot_s"), [
    pytest.param(timed("text/event-stream", {"ttft_us": "250000", "generation_us": "400000"}, {"completion_tokens": 5}),
                 0.25, 0.1, id="stream: first body byte, then (last - first) / (tokens - 1)"),
    pytest.param(timed("text/event-stream; charset=utf-8", {"ttft_us": "1500", "generation_us": "0"},
                       {"completion_tokens": 3}), 0.0015, 0.0, id="content-type-with-parameters"),
    pytest.param(timed("Text/Event-Stream", {"ttft_us": "1500", "generation_us": "0"},
                       {"completion_tokens": 3}), 0.0015, 0.0, id="content-type-in-any-case"),
    pytest.param(timed("text/event-stream", {"ttft_us": "250000", "generation_us": "400000"}, {"completion_tokens": 1}),
                 0.25, None, id="one-output-token-no-tpot"),
    pytest.param(timed("text/event-stream", {"ttft_us": "250000", "generation_us": "400000"}),
                 0.25, None, id="no-usage-no-tpot"),
    pytest.param(timed("text/event-stream", {"ttft_us": "-", "generation_us": "-"}, {"completion_tokens": 5}),
                 None, None, id="no-answer-body"),
    pytest.param(timed("text/event-stream", {}, {"completion_tokens": 5}), None, None, id="no-tags"),
    pytest.param(timed("application/json", {"ttft_us": "250000", "generation_us": "400000"}, {"completion_tokens": 5}),
                 None, None, id="json-answer-has-no-ttft"),
    pytest.param(timed(None, {"ttft_us": "250000", "generation_us": "400000"}, {"completion_tokens": 5}),
                 None, None, id="no-content-type"),
    pytest.param(timed("text/event-stream", {"ttft_us": "250000", "generation_us": "400000"},
                       {"completion_tokens": 5, "ttft_ms": 125, "tpot_ms": 20}),
                 0.25, 0.1, id="only-envoy-time-points-count-not-metadata"),
    pytest.param(timed("text/event-stream", {"ttft_us": "250000", "generation_us": "400000"},
                       {"completion_tokens": 5, "stream": False}),
                 None, None, id="a-request-that-did-not-ask-for-a-stream-has-none (as its file-log line)"),
])
def test_stream_timings_from_envoy_time_points(log_entry, ttft_s, tpot_s):
    rec = record_from_entry(log_entry)
    assert (rec.ttft_s, rec.tpot_s) == (pytest.approx(ttft_s) if ttft_s is not None else None,
                                        pytest.approx(tpot_s) if tpot_s is not None else None)


def cut(status: int, details: str, client_gone_flag: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    e = entry(status, details, meta={**DECISION, "stream": True})
    e.common_properties.response_flags.downstream_connection_termination = client_gone_flag
    return e


@pytest.mark.parametrize(("log_entry", "error_type"), [
    pytest.param(cut(200, "downstream_remote_disconnect", True), "downstream_remote_disconnect",
                 id="stream-cut-by-client-after-first-byte"),
    pytest.param(cut(0, "downstream_remote_disconnect", True), "downstream_remote_disconnect",
                 id="client-gone-before-first-byte"),
    pytest.param(cut(200, "via_upstream", True), "downstream_remote_disconnect", id="flag-alone"),
    pytest.param(cut(0, "", False), "client_disconnected", id="no-status-no-details"),
])
def test_client_that_hangs_up_is_client_cancelled(log_entry, error_type):
    """Users closing a tab mid-answer is not the gateway failing (the README's promise)."""
    rec = record_from_entry(log_entry)
    assert (rec.outcome, rec.error_type) == ("client_cancelled", error_type)
