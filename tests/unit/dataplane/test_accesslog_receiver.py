"""The access log service: Envoy's stream of access log entries recorded into the metrics, and
the budgets charged from them."""

from __future__ import annotations

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from extproc.dataplane.accesslog_receiver import AccessLogReceiver, charge_budgets, charge_owed
from extproc.telemetry.access_entries import record_from_entry
from extproc.telemetry.metrics import GatewayMetrics, RequestRecord
from support.access_log_entries import DECISION, HOST, entry
from support.budget_docs import admit, answered_entry, buckets_of, headers, make_gate


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


@pytest.fixture
def gate(tmp_path):
    return make_gate(tmp_path)


def test_access_log_entry_charges_its_buckets(gate):
    meta = admit(gate, headers(x_user_id="alice"))
    e = answered_entry(meta, total_tokens=17)
    owed: dict = {}
    charge_budgets(owed, e, record_from_entry(e))
    charge_budgets(owed, e, record_from_entry(e))
    e.response.response_code.value = 500  # a provider error that reported usage: billed, charged
    charge_budgets(owed, e, record_from_entry(e))
    e.common_properties.metadata.filter_metadata["llm_gateway"].fields.pop("total_tokens")
    charge_budgets(owed, e, record_from_entry(e))  # one without usage: nothing
    assert owed == {("", *buckets_of(meta)): [51, 0]}  # unpriced: no currency, no cost
    owed[("", *buckets_of(meta))] = [17, 0]
    charge_owed(gate, owed)
    assert admit(gate, headers(x_user_id="alice"))["ratelimit_remaining_tokens"] == "23"


def test_an_attempt_that_timed_out_at_a_provider_is_spent_unmetered_at_that_providers_model():
    """A failed-over attempt's own entry carries none of the request's decision: it is kept by
    request id and spent, once the request's entry comes, at the provider and model its rule gives
    that provider (b answered with `mb-main`; a's attempt was `ma`), and never for an attempt that
    did not reach the provider."""
    from extproc.protocol import UPSTREAM_END
    from support.failover_config import CONFIG, compiled

    table = compiled(CONFIG).table
    metrics = GatewayMetrics()
    receiver = AccessLogReceiver(metrics, table=lambda: table)

    def attempt(request_id: str, reached: bool):
        e = entry(None, "", meta={})
        e.common_properties.access_log_type = UPSTREAM_END
        e.common_properties.upstream_cluster = table.failover_clusters["a.example.com"]
        e.common_properties.response_flags.upstream_request_timeout = True
        if reached:
            e.common_properties.time_to_last_upstream_tx_byte.FromMilliseconds(2)
        e.request.request_id = request_id
        return e

    def answered(request_id: str):
        e = entry(200, meta={"route": "default/r", "rule": "main", "provider": "default/b",
                             "provider_host": "b.example.com", "request_model": "mb-main", "prompt_tokens": 8,
                             "completion_tokens": 9})
        e.request.request_id = request_id
        return e

    stream_logs(receiver, message(attempt("one", True), answered("one"), attempt("two", False), answered("two")))
    spent = {key: entry_[5] for key, entry_ in metrics.spend.entries.items() if entry_[5]}
    assert spent == {("", "default/r", "default/a", "ma", ""): 1}
    assert metrics.spend.entries[("", "default/r", "default/b", "mb-main", "")][0] == 2  # both answered
