"""Spend in money and traces, through a real Envoy: the cost of JSON, streamed and failed-over
answers in the access log, the metrics and the spend report (`/spend`, `extproc spend`), in two
currencies that are never added up; and OpenTelemetry spans received by a real OTLP gRPC
receiver, continuing the client's trace and reaching each provider's attempt, with a dead or
slow collector changing no answer (docs/cost.md, docs/tracing.md)."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
import urllib.request
from decimal import Decimal

import pytest

from support.helpers import CHAT, free_port, seed_dir, wait_until
from support.otlp_receiver import OtlpReceiver

DASHSCOPE, MOONSHOT, FAILOVER = "dashscope.aliyuncs.com", "api.moonshot.cn", "cost-failover"
SEVENTEEN = {"x-fake-total-tokens": "17"}  # 8 prompt, 9 completion tokens

PRICES = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: dashscope-prices}
spec:
  host: dashscope.aliyuncs.com
  currency: CNY
  models:
  - {model: qwen1.5-72b-chat, input: "1.00", output: "2.00", cachedInput: "0.25"}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: moonshot-prices}
spec:
  host: api.moonshot.cn
  currency: USD
  models:
  - {model: moonshot-v1-8k, input: 3, output: 3}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: cost-failover}
spec:
  host: cost-failover
  rules:
  - name: main
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
    fallbackRefs: [{providerHost: api.moonshot.cn}]
    retries: {attempts: 1, retryOn: [5xx]}
"""

# per million tokens: 5 uncached prompt tokens at 1.00, 3 cached at 0.25, 9 completion at 2.00
JSON_COST = Decimal("0.00002375")
STREAM_COST = Decimal("0.000026")  # 8 at 1.00 + 9 at 2.00
FAILOVER_COST = Decimal("0.000051")  # moonshot answered: 17 tokens at 3.00, in USD


def priced_config(tmp_path):
    config = seed_dir(tmp_path, "01", "04")
    (config / "20-prices.yaml").write_text(PRICES)
    return config


def spend(gw, by: str = "caller,model,route") -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/spend?by={by}", timeout=5) as r:
        return json.loads(r.read())


def metric(gw, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in gw.metrics().items() if n == name and wanted <= set(ls))


def send_mix(gw) -> None:
    """A JSON answer with cached tokens, a streamed one, a failed-over one, an unpriced embedding."""
    resp = gw.request(DASHSCOPE, CHAT, {**SEVENTEEN, "x-fake-cached-tokens": "3"})
    assert resp.status == 200, resp.body
    resp = gw.request(DASHSCOPE, {**CHAT, "stream": True}, SEVENTEEN)
    assert resp.status == 200 and b"data: [DONE]" in resp.body, resp.body
    resp = gw.request(FAILOVER, CHAT, {**SEVENTEEN, "x-fake-fail": "dashscope:503"})
    assert resp.status == 200 and resp.json()["model"] == "moonshot-v1-8k", resp.body
    resp = gw.request(DASHSCOPE, {"model": "text-embedding-v3", "input": "one two three"}, path="/v1/embeddings")
    assert resp.status == 200, resp.body


def test_cost_of_json_streamed_and_failed_over_answers_in_log_metrics_and_spend(tmp_path, gateway_factory):
    gw = gateway_factory(priced_config(tmp_path))
    send_mix(gw)
    wait_until(lambda: len([e for e in gw.access_entries() if e.get("kind") != "attempt"]) >= 4, 10,
               lambda: f"access log: {gw.access_entries()}")
    lines = [e for e in gw.access_entries() if e.get("kind") != "attempt"]
    by_kind = {("stream" if e["stream"] else e["operation"], e["host"]): e for e in lines}
    json_line, stream_line = by_kind[("chat", DASHSCOPE)], by_kind[("stream", DASHSCOPE)]
    failover_line, embedding_line = by_kind[("chat", FAILOVER)], by_kind[("embeddings", DASHSCOPE)]
    # Envoy's CEL writes the cost as a double's text: equal to the exact cost as a number
    assert json_line["currency"] == "CNY" and json_line["cached_tokens"] == 3
    assert Decimal(json_line["cost"]) == pytest.approx(JSON_COST, rel=Decimal("1e-9"))
    assert stream_line["currency"] == "CNY"
    assert Decimal(stream_line["cost"]) == pytest.approx(STREAM_COST, rel=Decimal("1e-9"))
    # the attempt that answered is priced at its own provider's price, in its own currency
    assert failover_line["provider"] == "default/moonshot" and failover_line["attempts"] == 2
    assert failover_line["currency"] == "USD"
    assert Decimal(failover_line["cost"]) == pytest.approx(FAILOVER_COST, rel=Decimal("1e-9"))
    # a model without a price: no cost, never 0
    assert embedding_line["prompt_tokens"] == 3 and embedding_line["cost"] is None
    assert embedding_line["currency"] is None

    wait_until(lambda: metric(gw, "llm_gateway_spend_requests_total") == 4, 10, lambda: f"{gw.metrics()}")
    assert metric(gw, "llm_gateway_cost_total", currency="CNY") == pytest.approx(float(JSON_COST + STREAM_COST))
    assert metric(gw, "llm_gateway_cost_total", currency="USD") == pytest.approx(float(FAILOVER_COST))
    assert metric(gw, "llm_gateway_spend_requests_total", currency="") == 1  # the unpriced embedding
    assert metric(gw, "llm_gateway_spend_tokens_total", gen_ai_token_type="cached_input") == 3
    assert metric(gw, "llm_gateway_cost_total", llm_route="default/cost-failover", llm_provider="default/moonshot",
                  gen_ai_request_model="moonshot-v1-8k") == pytest.approx(float(FAILOVER_COST))

    report = spend(gw)
    assert report["totals"] == [{"currency": "CNY", "cost": str(JSON_COST + STREAM_COST)},
                                {"currency": "USD", "cost": str(FAILOVER_COST)}]
    assert report["unpriced"] == {"requests": 1, "input_tokens": 3, "output_tokens": 0}
    rows = {(r["model"], r["route"], r["currency"]): r for r in report["rows"]}
    qwen = rows[("qwen1.5-72b-chat", "default/dashscope-qwen", "CNY")]
    counts = (qwen["requests"], qwen["input_tokens"], qwen["output_tokens"], qwen["cached_input_tokens"])
    assert counts == (2, 16, 18, 3)
    assert qwen["cost"] == str(JSON_COST + STREAM_COST) and qwen["caller"] == ""
    assert rows[("moonshot-v1-8k", "default/cost-failover", "USD")]["cost"] == str(FAILOVER_COST)
    assert rows[("text-embedding-v3", "default/dashscope-qwen", None)]["cost"] is None
    assert spend(gw, "model")["rows"][0].keys() >= {"model", "currency", "cost"}

    # the command line reads the same report
    out = subprocess.run([sys.executable, "-m", "extproc", "spend", "--url", f"http://127.0.0.1:{gw.metrics_port}",
                          "--by", "model"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert f"total CNY: {JSON_COST + STREAM_COST}" in out.stdout and f"total USD: {FAILOVER_COST}" in out.stdout
    assert "unpriced: 1 requests" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "extproc", "spend", "--url", f"http://127.0.0.1:{gw.metrics_port}",
                          "--by", "user"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 1 and "cannot group by user" in bad.stderr


def test_a_budget_key_is_the_caller_spend_is_grouped_by(tmp_path, gateway_factory):
    config = priced_config(tmp_path)
    (config / "30-budget.yaml").write_text("""apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: per-user}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules: [{name: everyone, tokens: 100000, per: 1h}]
""")
    gw = gateway_factory(config)
    for user in ("alice", "alice", "bob"):
        assert gw.request(DASHSCOPE, CHAT, {**SEVENTEEN, "x-user-id": user}).status == 200
    from extproc.policy.budgets import key_hash

    wait_until(lambda: metric(gw, "llm_gateway_spend_requests_total") == 3, 10, lambda: f"{gw.metrics()}")
    rows = {r["caller"]: r for r in spend(gw, "caller")["rows"]}
    assert rows[f"key:{key_hash('alice')}"]["requests"] == 2 and rows[f"key:{key_hash('bob')}"]["requests"] == 1
    assert rows[f"key:{key_hash('alice')}"]["cost"] == str(2 * STREAM_COST)
    assert "alice" not in json.dumps(spend(gw, "caller"))  # key values never raw


@pytest.fixture
def collector():
    receiver = OtlpReceiver().start()
    yield receiver
    receiver.stop()


def test_spans_continue_the_clients_trace_and_reach_every_attempts_provider(tmp_path, gateway_factory, collector,
                                                                             fresh_providers):
    gw = gateway_factory(priced_config(tmp_path), ["--otlp-endpoint", collector.endpoint])
    client_trace, client_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    resp = gw.request(DASHSCOPE, CHAT, {**SEVENTEEN, "traceparent": f"00-{client_trace}-{client_span}-01"})
    assert resp.status == 200, resp.body
    resp = gw.request(FAILOVER, CHAT, {**SEVENTEEN, "x-fake-fail": "dashscope:503"})
    assert resp.status == 200, resp.body
    wait_until(lambda: len(collector.received()) >= 5, 15, lambda: f"spans: {collector.received()}")
    spans = collector.received()
    assert collector.resources[0]["service.name"] == "llm-gateway"

    # the client's request: one SERVER span, child of the client's span, and its one attempt
    (request,) = [s for s in spans if s["trace_id"] == client_trace and s["kind"] == 2]  # SERVER
    assert request["parent_span_id"] == client_span and request["name"] == "chat qwen1.5-72b-chat"
    attrs = request["attributes"]
    assert (attrs["gen_ai.operation.name"], attrs["gen_ai.provider.name"], attrs["gen_ai.request.model"],
            attrs["gen_ai.response.model"]) == ("chat", DASHSCOPE, "qwen1.5-72b-chat", "qwen1.5-72b-chat")
    assert (attrs["gen_ai.usage.input_tokens"], attrs["gen_ai.usage.output_tokens"]) == (8, 9)
    assert attrs["llm_gateway.route"] == "default/dashscope-qwen" and attrs["llm_gateway.rule"] == "default"
    assert attrs["llm_gateway.cost"] == pytest.approx(float(STREAM_COST))
    assert attrs["llm_gateway.cost.currency"] == "CNY"
    assert attrs["gen_ai.response.finish_reasons"] == ["stop"]  # read by Envoy's answer reader
    assert "gen_ai.input.messages" not in attrs and "gen_ai.output.messages" not in attrs  # contents: off
    (attempt,) = [s for s in spans if s["trace_id"] == client_trace and s["kind"] == 3]  # CLIENT
    assert attempt["parent_span_id"] == request["span_id"] and attempt["attributes"]["llm_gateway.attempt"] == 1
    assert request["start"] <= attempt["start"] <= attempt["end"] <= request["end"]
    # the provider got the client's trace, with the attempt's span as parent
    sent = [r for r in fresh_providers[DASHSCOPE].requests if r.headers.get("x-fake-fail") is None]
    assert sent[0].headers["traceparent"] == f"00-{client_trace}-{attempt['span_id']}-01"

    # the failed-over request: a new trace, two attempts, each provider its own attempt's span
    (failed_over,) = [s for s in spans if s["trace_id"] != client_trace and s["kind"] == 2]
    assert failed_over["parent_span_id"] == "" and failed_over["attributes"]["llm_gateway.attempts"] == 2
    tries = sorted((s for s in spans if s["trace_id"] == failed_over["trace_id"] and s["kind"] == 3),
                   key=lambda s: s["attributes"]["llm_gateway.attempt"])
    assert [(t["attributes"]["gen_ai.provider.name"], t["attributes"].get("http.response.status_code"), t["status"])
            for t in tries] == [(DASHSCOPE, 503, 2), (MOONSHOT, 200, 0)]  # 2: ERROR, 0: UNSET
    assert all(t["parent_span_id"] == failed_over["span_id"] for t in tries)
    first = [r for r in fresh_providers[DASHSCOPE].requests if r.headers.get("x-fake-fail")][0]
    second = [r for r in fresh_providers[MOONSHOT].requests if r.headers.get("x-fake-fail")][0]
    assert first.headers["traceparent"] == f"00-{failed_over['trace_id']}-{tries[0]['span_id']}-01"
    assert second.headers["traceparent"] == f"00-{failed_over['trace_id']}-{tries[1]['span_id']}-01"
    assert tries[1]["attributes"]["gen_ai.usage.input_tokens"] == 8
    assert failed_over["attributes"]["llm_gateway.cost.currency"] == "USD"
    wait_until(lambda: metric(gw, "llm_gateway_trace_spans_total", result="exported") >= 5, 10,
               lambda: f"{gw.metrics()}")


def test_a_dead_collector_changes_no_answer_and_a_full_queue_drops_counted(tmp_path, gateway_factory,
                                                                            fresh_providers):
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    gw = gateway_factory(priced_config(tmp_path), ["--otlp-endpoint", dead],
                         env={"OTEL_EXPORTER_OTLP_TIMEOUT": "1", "OTEL_BSP_MAX_QUEUE_SIZE": "4"})
    answers = []
    for _ in range(12):
        resp = gw.request(DASHSCOPE, CHAT, SEVENTEEN)
        assert resp.status == 200, resp.body
        answers.append(resp.json()["choices"][0]["message"]["content"])
    assert set(answers) == {"Hello! I am qwen1.5-72b-chat, served by dashscope."}
    wait_until(lambda: metric(gw, "llm_gateway_trace_spans_total", result="dropped") > 0
               and metric(gw, "llm_gateway_trace_spans_total", result="failed") > 0, 20, lambda: f"{gw.metrics()}")
    assert metric(gw, "llm_gateway_trace_spans_total", result="exported") == 0
    # the providers still got a trace context, and the requests were counted as ever
    assert all("traceparent" in r.headers for r in fresh_providers[DASHSCOPE].requests)
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="success") == 12, 10, lambda: f"{gw.metrics()}")


def test_without_an_exporter_nothing_is_traced(tmp_path, gateway_factory, fresh_providers):
    gw = gateway_factory(priced_config(tmp_path))
    assert gw.request(DASHSCOPE, CHAT, {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
                      ).status == 200
    (sent,) = fresh_providers[DASHSCOPE].requests
    assert sent.headers["traceparent"] == "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"  # passed on as is
    wait_until(lambda: gw.access_entries(), 10)
    assert gw.access_entries()[0]["trace_id"] is None
    assert not [k for k in gw.metrics() if k[0].startswith("llm_gateway_trace_spans")]


SLOW_FAILOVER = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: slow-failover}
spec:
  host: slow-failover
  rules:
  - name: main
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
    fallbackRefs: [{providerHost: api.moonshot.cn}]
    retries: {attempts: 1, perTryTimeout: 1s, retryOn: [5xx]}
"""


def test_spend_of_every_instance_from_redis_and_the_attempts_nobody_metered(tmp_path, gateway_factory,
                                                                               redis_server):
    """Two instances on one Redis: `/spend` (and `extproc spend`) on either answers for both; an
    attempt that reached a provider and timed out (failed over) and a stream cut before its usage
    event are counted as unmetered (the provider may have billed them: nobody saw for what)."""
    config = priced_config(tmp_path)
    (config / "25-slow.yaml").write_text(SLOW_FAILOVER)
    gws = [gateway_factory(config, ["--redis", redis_server.url]) for _ in range(2)]
    assert gws[0].request(DASHSCOPE, CHAT, SEVENTEEN).status == 200
    resp = gws[1].request(DASHSCOPE, {**CHAT, "stream": True}, SEVENTEEN)
    assert resp.status == 200 and b"data: [DONE]" in resp.body
    # the first attempt reaches DashScope, which does not answer within the per-try timeout: Moonshot answers
    resp = gws[0].request("slow-failover", CHAT, {**SEVENTEEN, "x-fake-fail": "dashscope:delay=3"})
    assert resp.status == 200 and resp.json()["model"] == "moonshot-v1-8k", resp.body
    # a stream cut after its first event: no usage event ever came
    conn = http.client.HTTPConnection("127.0.0.1", gws[1].listen_port, timeout=30)
    conn.request("POST", f"http://{DASHSCOPE}/", body=json.dumps({**CHAT, "stream": True}),
                 headers={"content-type": "application/json", **SEVENTEEN, "x-fake-fail": "dashscope:cut=1"})
    cut = conn.getresponse()
    with pytest.raises(http.client.IncompleteRead):
        cut.read()
    conn.close()

    expected = [{"currency": "CNY", "cost": str(2 * STREAM_COST)}, {"currency": "USD", "cost": str(FAILOVER_COST)}]
    for gw in gws:  # either instance answers for both, from Redis
        wait_until(lambda gw=gw: spend(gw, "provider")["totals"] == expected
                   and spend(gw, "provider")["unmetered_attempts"] == 2, 15, lambda gw=gw: json.dumps(spend(gw)))
    report = spend(gws[1], "provider,route")
    assert report["source"] == "redis" and report["since"].endswith("T00:00:00Z")
    rows = {(r["provider"], r["route"]): r for r in report["rows"]}
    qwen = rows[("default/dashscope-qwen", "default/dashscope-qwen")]
    assert (qwen["requests"], qwen["input_tokens"], qwen["output_tokens"], qwen["unmetered_attempts"]) == (2, 16, 18, 1)
    # the timed-out attempt: DashScope's, on the failover route, in DashScope's currency
    timed_out = rows[("default/dashscope-qwen", "default/slow-failover")]
    assert (timed_out["requests"], timed_out["unmetered_attempts"], timed_out["currency"]) == (0, 1, "CNY")
    assert rows[("default/moonshot", "default/slow-failover")]["cost"] == str(FAILOVER_COST)
    # one process's own counts, as before
    mine = spend(gws[1], "provider&source=process")
    assert mine["source"] == "process" and mine["totals"] == [{"currency": "CNY", "cost": str(STREAM_COST)}]
    assert metric(gws[1], "llm_gateway_spend_unmetered_attempts_total", llm_provider="default/dashscope-qwen") == 1

    out = subprocess.run([sys.executable, "-m", "extproc", "spend", "--url", f"http://127.0.0.1:{gws[0].metrics_port}",
                          "--by", "provider"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "by every instance sharing Redis" in out.stdout and f"total USD: {FAILOVER_COST}" in out.stdout
    assert "unmetered: 2 attempts" in out.stdout
    out = subprocess.run([sys.executable, "-m", "extproc", "spend", "--url", f"http://127.0.0.1:{gws[0].metrics_port}",
                          "--source", "process", "--since", "2026-01-01"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "by this gateway process" in out.stdout, out.stderr


POLICY = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: watch-projects}
spec:
  hosts: [cost-failover]
  rules:
  - name: projects
    detectors: [{keywords: [Project Falcon], name: project}]
    action: log
"""
SECRET = "sk-" + "a1B2c3D4e5F6g7H8i9J0kLmN"
CARD = "4111 1111 1111 1111"


def test_finish_reasons_and_contents_in_spans_only_when_turned_on_and_always_masked(tmp_path, gateway_factory,
                                                                                      collector, fresh_providers):
    """With OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true, a sampled request's span
    carries its prompt and its answer (JSON, and a stream's deltas), masked: every built-in
    detector always (a key, an email, a card), and what the route's data policies look for even
    where they only log; the finish reason of both answers; never a raw value in any span."""
    config = priced_config(tmp_path)
    (config / "30-policy.yaml").write_text(POLICY)
    gw = gateway_factory(config, ["--otlp-endpoint", collector.endpoint],
                         env={"OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT": "true"})
    said = f"My key is {SECRET}, mail bob@example.com about Project Falcon"
    prompt = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": said}]}
    reply = {"x-fake-reply": f"Charge card {CARD} for Project Falcon"}
    assert gw.request(DASHSCOPE, prompt, {**SEVENTEEN, **reply}).status == 200
    streamed = gw.request(FAILOVER, {**prompt, "stream": True}, {**SEVENTEEN, **reply})
    assert streamed.status == 200 and b"data: [DONE]" in streamed.body
    # every event written in two pieces: what the reader looks for may straddle two chunks
    split = gw.request(DASHSCOPE, {**prompt, "stream": True}, {**SEVENTEEN, **reply, "x-fake-split": "1"})
    assert split.status == 200 and b"data: [DONE]" in split.body
    wait_until(lambda: len([s for s in collector.received() if s["kind"] == 2]) >= 3, 15,
               lambda: f"spans: {collector.received()}")
    spans = [s["attributes"] for s in collector.received() if s["kind"] == 2]
    (split_span,) = [a for a in spans if a["llm_gateway.stream"] and a["llm_gateway.route"] == "default/dashscope-qwen"]
    assert split_span["gen_ai.response.finish_reasons"] == ["stop"]
    assert "[BANK-CARD]" in json.loads(split_span["gen_ai.output.messages"])[0]["parts"][0]["content"]
    requests = {a["llm_gateway.route"]: a for a in spans if a is not split_span}
    for route, masked_with in (("default/dashscope-qwen", "builtins"), ("default/cost-failover", "builtins+policies")):
        attrs = requests[route]
        assert attrs["gen_ai.response.finish_reasons"] == ["stop"]
        assert attrs["llm_gateway.contents.masked_with"] == masked_with
        inputs = json.loads(attrs["gen_ai.input.messages"])
        assert [m["role"] for m in inputs] == ["system", "user"]
        said = inputs[1]["parts"][0]["content"]
        assert "[SECRET]" in said and "[EMAIL]" in said and SECRET not in said and "bob@example.com" not in said
        (answer,) = json.loads(attrs["gen_ai.output.messages"])
        assert answer["role"] == "assistant" and answer["finish_reason"] == "stop"
        text = answer["parts"][0]["content"]
        assert "[BANK-CARD]" in text and CARD not in text and text.startswith("Charge card"), text
        # the route's policy looks for the project's name: masked in its spans only
        assert ("Project Falcon" in said + text) is (masked_with == "builtins")
    everything = json.dumps(collector.received())
    assert SECRET not in everything and CARD not in everything and "bob@example.com" not in everything
    assert SECRET not in gw.log() and CARD not in gw.log()
    # the providers got the prompt as the client sent it (capturing contents changes no request)
    assert any(SECRET in json.dumps(r.body) for r in fresh_providers[DASHSCOPE].requests)
