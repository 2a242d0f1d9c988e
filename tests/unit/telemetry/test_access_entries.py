"""Envoy's gRPC access log entries turned into request records: labels, outcome, error type,
tokens and timings."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2

from extproc.protocol import METADATA_NAMESPACE
from extproc.telemetry.access_entries import record_from_entry
from extproc.telemetry.metrics import RequestRecord
from support.access_log_entries import DECISION, LABELS, entry


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
        RequestRecord(**LABELS, status=503, outcome="gateway_error",
                      error_type="upstream_reset_before_response_started", duration_s=0.012),
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


def operation_entry(meta: dict, status: int = 200, details: str = "via_upstream"):
    from envoy.data.accesslog.v3 import accesslog_pb2

    e = accesslog_pb2.HTTPAccessLogEntry()
    e.response.response_code.value = status
    e.response.response_code_details = details
    e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(meta)
    return e


@pytest.mark.parametrize(("meta", "status", "details", "operation", "outcome", "tokens"), [
    ({"operation": "embeddings", "prompt_tokens": 7, "total_tokens": 7}, 200, "via_upstream", "embeddings", "success",
     {"input": 7.0}),
    ({"operation": "text_completion", "prompt_tokens": 3, "completion_tokens": 5}, 200, "via_upstream",
     "text_completion", "success", {"input": 3.0, "output": 5.0}),
    ({"prompt_tokens": 3, "completion_tokens": 5}, 200, "via_upstream", "chat", "success",
     {"input": 3.0, "output": 5.0}),
    ({"operation": "models"}, 200, "llm_gateway_models", "models", "success", {}),
    ({"operation": "embeddings"}, 429, "via_upstream", "embeddings", "provider_error", {}),
])
def test_operation_reaches_the_metrics(meta, status, details, operation, outcome, tokens):
    from extproc.telemetry.access_entries import record_from_entry
    from extproc.telemetry.metrics import GatewayMetrics

    record = record_from_entry(operation_entry({"route": "default/r", "provider_host": "h", **meta}, status, details))
    assert (record.operation, record.outcome) == (operation, outcome)
    metrics = GatewayMetrics()
    metrics.observe(record)
    samples = {(s.name, s.labels.get("gen_ai_token_type")): (s.value, s.labels)
               for family in metrics.registry.collect() for s in family.samples}
    value, labels = samples[("llm_gateway_requests_total", None)]
    assert value == 1 and labels["gen_ai_operation_name"] == operation and labels["outcome"] == outcome
    for kind, count in tokens.items():
        value, labels = samples[("gen_ai_client_token_usage_sum", kind)]
        assert value == count and labels["gen_ai_operation_name"] == operation


def test_a_provider_without_an_address_is_counted_by_its_code():
    """Envoy's 503 for a provider cluster that has no host (its name has not resolved): the
    same code as the client's JSON error (extproc.envoy.local_replies)."""
    e = entry(503, "no_healthy_upstream", meta=DECISION)
    e.common_properties.response_flags.no_healthy_upstream = True
    rec = record_from_entry(e)
    assert (rec.outcome, rec.error_type) == ("gateway_error", "provider_address_unknown")


def overflow(details: str, upstream_overflow: bool) -> accesslog_pb2.HTTPAccessLogEntry:
    e = entry(503, details, meta=DECISION)
    e.common_properties.response_flags.upstream_overflow = upstream_overflow
    return e


@pytest.mark.parametrize(("log_entry", "outcome", "error_type"), [
    pytest.param(overflow("upstream_reset_before_response_started{overflow}", True), "gateway_error", "overloaded",
                 id="provider-cluster-full"),
    pytest.param(overflow("ext_proc_error_gRPC_error_14{upstream_connect_error_or_disconnect/reset_before_headers."
                          "_reset_reason:_overflow{upstream_reset_before_response_started{overflow}}}", False),
                 "gateway_error", "overloaded", id="ext_proc-cluster-full"),
    pytest.param(overflow("ext_proc_error_gRPC_error_14{upstream_connect_error_or_disconnect/reset_before_headers."
                          "_reset_reason:_remote_connection_failure}", False),
                 "gateway_error", "ext_proc_error_gRPC_error_14", id="ext_proc-down-is-not-overload"),
    pytest.param(overflow("upstream_reset_before_response_started{remote_connection_failure}", False),
                 "gateway_error", "upstream_reset_before_response_started", id="provider-down-is-not-overload"),
    pytest.param(entry(503, "llm_gateway_overloaded", meta=DECISION), "gateway_error", "overloaded",
                 id="ext_proc-body-memory-same-error-type"),
])
def test_a_refusal_at_a_limit_of_requests_in_flight_counts_as_overloaded(log_entry, outcome, error_type):
    """Envoy's circuit breakers refuse with Envoy's own reason; the metrics count them under the
    error the client got (`overloaded`), as the ext_proc's own 503 of that code is counted."""
    rec = record_from_entry(log_entry)
    assert (rec.outcome, rec.error_type) == (outcome, error_type)
