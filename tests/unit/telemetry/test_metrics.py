"""GatewayMetrics.observe: one request record in, histogram and counter samples out."""

from __future__ import annotations

import pytest

from extproc.telemetry import metrics as metrics_module
from extproc.telemetry.metrics import GatewayMetrics, RequestRecord

BASE = dict(route="llm-route", rule="default", provider="dashscope", provider_host="dashscope.aliyuncs.com",
            request_model="qwen-turbo", response_model="qwen-turbo-0919")


def labels(response_model: str = "qwen-turbo-0919", **extra: str) -> dict[str, str]:
    return {"gen_ai_operation_name": "chat", "gen_ai_provider_name": "dashscope.aliyuncs.com",
            "gen_ai_request_model": "qwen-turbo", "gen_ai_response_model": response_model, "llm_route": "llm-route",
            "llm_rule": "default", "llm_provider": "dashscope", **extra}


def record(**fields) -> RequestRecord:
    return RequestRecord(**{**BASE, "status": 200, "outcome": "success", **fields})


def sample(m: GatewayMetrics, name: str, **label_values) -> float | None:
    return m.registry.get_sample_value(name, label_values)


@pytest.fixture
def m() -> GatewayMetrics:
    return GatewayMetrics()


def test_token_usage_split_by_token_type(m):
    m.observe(record(prompt_tokens=12, completion_tokens=300))
    m.observe(record(prompt_tokens=100, completion_tokens=1))
    m.observe(record(prompt_tokens=0))  # zero is a count, not an absence
    name = "gen_ai_client_token_usage"
    assert sample(m, f"{name}_sum", **labels(gen_ai_token_type="input")) == 112
    assert sample(m, f"{name}_count", **labels(gen_ai_token_type="input")) == 3
    assert sample(m, f"{name}_sum", **labels(gen_ai_token_type="output")) == 301
    assert sample(m, f"{name}_count", **labels(gen_ai_token_type="output")) == 2
    # GenAI buckets: 1, 4, 16, 64, 256, 1024...
    assert sample(m, f"{name}_bucket", **labels(gen_ai_token_type="input", le="1.0")) == 1
    assert sample(m, f"{name}_bucket", **labels(gen_ai_token_type="input", le="16.0")) == 2
    assert sample(m, f"{name}_bucket", **labels(gen_ai_token_type="input", le="64.0")) == 2
    assert sample(m, f"{name}_bucket", **labels(gen_ai_token_type="input", le="256.0")) == 3
    assert sample(m, f"{name}_bucket", **labels(gen_ai_token_type="output", le="256.0")) == 1
    assert sample(m, f"{name}_bucket", **labels(gen_ai_token_type="output", le="1024.0")) == 2


def test_no_tokens_no_token_samples(m):
    m.observe(record())
    name = "gen_ai_client_token_usage_count"
    assert sample(m, name, **labels(gen_ai_token_type="input")) is None
    assert sample(m, name, **labels(gen_ai_token_type="output")) is None


def test_request_duration_labelled_with_error_type(m):
    m.observe(record(duration_s=0.5))
    m.observe(record(duration_s=1.5))
    m.observe(record(status=429, outcome="provider_error", error_type="429", duration_s=0.03))
    m.observe(record(status=503, outcome="gateway_error", error_type="no_healthy_upstream"))  # no duration
    name = "gen_ai_server_request_duration_seconds"
    assert sample(m, f"{name}_count", **labels(error_type="")) == 2
    assert sample(m, f"{name}_sum", **labels(error_type="")) == pytest.approx(2.0)
    assert sample(m, f"{name}_count", **labels(error_type="429")) == 1
    assert sample(m, f"{name}_sum", **labels(error_type="429")) == pytest.approx(0.03)
    assert sample(m, f"{name}_bucket", **labels(error_type="429", le="0.02")) == 0
    assert sample(m, f"{name}_bucket", **labels(error_type="429", le="0.04")) == 1
    assert sample(m, f"{name}_count", **labels(error_type="no_healthy_upstream")) is None


def test_ttft_and_tpot_only_when_present(m):
    m.observe(record(stream=True, ttft_s=0.2, tpot_s=0.03))
    m.observe(record(stream=True, ttft_s=0.4))  # one output token: no time per token
    m.observe(record())  # a JSON answer: neither
    ttft, tpot = "gen_ai_server_time_to_first_token_seconds", "gen_ai_server_time_per_output_token_seconds"
    assert sample(m, f"{ttft}_count", **labels()) == 2
    assert sample(m, f"{ttft}_sum", **labels()) == pytest.approx(0.6)
    assert sample(m, f"{ttft}_bucket", **labels(le="0.25")) == 1
    assert sample(m, f"{tpot}_count", **labels()) == 1
    assert sample(m, f"{tpot}_sum", **labels()) == pytest.approx(0.03)


def test_nothing_timed_nothing_observed(m):
    m.observe(record(response_model="m2"))
    for name in ("gen_ai_server_time_to_first_token_seconds_count",
                 "gen_ai_server_time_per_output_token_seconds_count"):
        assert sample(m, name, **labels("m2")) is None
    assert sample(m, "gen_ai_server_request_duration_seconds_count", **labels("m2", error_type="")) is None
    assert sample(m, "llm_gateway_requests_total", **labels("m2", outcome="success", error_type="")) == 1


def test_requests_total_by_outcome(m):
    for rec in (record(), record(), record(status=429, outcome="provider_error", error_type="429"),
                record(status=200, outcome="provider_error", error_type="server_error"),
                record(status=400, outcome="rejected", error_type="invalid_json"),
                record(status=400, outcome="rejected", error_type="invalid_json")):
        m.observe(rec)
    name = "llm_gateway_requests_total"
    assert sample(m, name, **labels(outcome="success", error_type="")) == 2
    assert sample(m, name, **labels(outcome="provider_error", error_type="429")) == 1
    assert sample(m, name, **labels(outcome="provider_error", error_type="server_error")) == 1
    assert sample(m, name, **labels(outcome="rejected", error_type="invalid_json")) == 2
    assert sample(m, name, **labels(outcome="gateway_error", error_type="")) is None


def test_labels_carry_the_record(m):
    m.observe(RequestRecord(route="r", rule="", provider="p", provider_host="h", request_model="rq",
                            response_model="rs", outcome="success"))
    assert sample(m, "llm_gateway_requests_total", gen_ai_operation_name="chat", gen_ai_provider_name="h",
                  gen_ai_request_model="rq", gen_ai_response_model="rs", llm_route="r", llm_rule="",
                  llm_provider="p", outcome="success", error_type="") == 1


def test_response_model_labels_capped(m, monkeypatch):
    monkeypatch.setattr(metrics_module, "MAX_MODEL_LABELS", 2)
    for model in ("", "a", "b", "c", "d", "a", "", "b"):
        m.observe(record(response_model=model, prompt_tokens=1))
    name = "llm_gateway_requests_total"

    def count(model: str) -> float | None:
        return sample(m, name, **labels(model, outcome="success", error_type=""))

    assert (count("a"), count("b"), count("other"), count("")) == (2, 2, 2, 2)  # "" takes no place
    assert count("c") is None and count("d") is None
    assert sample(m, "gen_ai_client_token_usage_count", **labels("other", gen_ai_token_type="input")) == 2


def test_model_cap_is_per_instance(monkeypatch):
    monkeypatch.setattr(metrics_module, "MAX_MODEL_LABELS", 1)
    first, second = GatewayMetrics(), GatewayMetrics()
    first.observe(record(response_model="a"))
    first.observe(record(response_model="b"))
    second.observe(record(response_model="b"))
    assert sample(first, "llm_gateway_requests_total", **labels("other", outcome="success", error_type="")) == 1
    assert sample(second, "llm_gateway_requests_total", **labels("b", outcome="success", error_type="")) == 1


def test_registries_are_separate():
    one, two = GatewayMetrics(), GatewayMetrics()
    one.observe(record())
    assert sample(two, "llm_gateway_requests_total", **labels(outcome="success", error_type="")) is None


def test_no_created_series(m):
    m.observe(record(prompt_tokens=1, duration_s=0.1))
    names = {s.name for metric in m.registry.collect() for s in metric.samples}
    assert names and not any(n.endswith("_created") for n in names)


def test_client_supplied_values_are_capped_too(monkeypatch):
    import extproc.telemetry.metrics as metrics_module
    monkeypatch.setattr(metrics_module, "MAX_MODEL_LABELS", 1)
    m = GatewayMetrics()
    for i in range(3):
        m.observe(RequestRecord(request_model=f"client-model-{i}", outcome="provider_error", error_type=f"kind-{i}"))
    values = {(s.labels["gen_ai_request_model"], s.labels["error_type"]): s.value
              for s in m.requests.collect()[0].samples if s.name.endswith("_total")}
    assert values == {("client-model-0", "kind-0"): 1.0, ("other", "other"): 2.0}
