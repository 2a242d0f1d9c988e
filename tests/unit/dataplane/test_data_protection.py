"""The ext_proc with an LLMDataPolicy: refused, masked and logged requests as Envoy gets them
(answers, body, metadata for the access log), the metrics, every endpoint's prompt, a judge's
failure mode without a client, which requests are marked for their answer to be checked, and a
route without a policy answered byte for byte as before.
Nothing found is ever in an answer's error, its metadata or a metric."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format
from prometheus_client import CollectorRegistry, generate_latest

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.dataplane.data_protection import ProtectionMetrics
from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.table import TableHolder
from extproc.protocol import METADATA_NAMESPACE
from support.ext_proc_messages import body_msg, error_of, headers_msg, run

PROVIDERS = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope}
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-inline-key-of-the-provider}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot}
spec:
  host: api.moonshot.cn
  configs: {defaultConfig: {openAIConfig: {model: moonshot-v1-8k, apiKey: sk-inline-key-of-the-provider}}}
"""
POLICY = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: no-secrets-out}
spec:
  hosts: [dashscope.aliyuncs.com]
  rules:
  - name: ids-and-cards
    detectors: [{builtin: china-resident-id}, {builtin: bank-card}, {builtin: email}]
    action: mask
  - name: credentials
    detectors: [{builtin: secret}, {regex: 'ACME-[0-9]{6}', name: acme-ticket}]
    action: block
  - name: addresses
    detectors: [{builtin: ipv4}]
    action: log
"""
EMAIL, CARD, ID = "jane.roe@example.com", "4111 1111 1111 1111", "11010519491231002X"
SECRET = "sk-live-0123456789abcdefABCDEF0123"
DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"


def table(extra: str = POLICY):
    objects, problems = load_text(PROVIDERS + extra, "c.yaml")
    assert problems == []
    return compile_config(objects).table


def gateway(config: str = POLICY) -> tuple[ExternalProcessor, CollectorRegistry]:
    registry = CollectorRegistry()
    return ExternalProcessor(TableHolder(table(config)), protection=ProtectionMetrics(registry)), registry


def send(processor, body, host=DASHSCOPE, path="/v1/chat/completions"):
    return run(processor, headers_msg(host, extra={":path": path}), body_msg(body))


def metadata(response: pb.ProcessingResponse) -> dict:
    return json_format.MessageToDict(response.dynamic_metadata).get(METADATA_NAMESPACE, {})


def chat(*contents) -> dict:
    return {"messages": [{"role": "user", "content": c} for c in contents]}


def samples(registry, name: str) -> dict[tuple, float]:
    return {tuple(sorted(s.labels.items())): s.value for f in registry.collect() for s in f.samples
            if s.name == name}


def test_mask_replaces_values_and_forwards():
    processor, registry = gateway()
    headers, body = send(processor, chat(f"card {CARD}, mail {EMAIL}", [{"type": "text", "text": f"id {ID}"}]))
    sent = json.loads(body.request_body.response.body_mutation.body)
    assert sent["messages"] == [{"role": "user", "content": "card [BANK-CARD], mail [EMAIL]"},
                                {"role": "user", "content": [{"type": "text", "text": "id [CHINA-RESIDENT-ID]"}]}]
    assert sent["model"] == "qwen-max"
    meta = metadata(headers)
    assert (meta["data_policy"], meta["data_rule"], meta["data_action"]) == ("default/no-secrets-out",
                                                                            "ids-and-cards", "mask")
    assert meta["data_detectors"] == "bank-card,china-resident-id,email"
    assert meta["route"] == "default/dashscope"  # the decision's entries are all still there
    assert samples(registry, "llm_gateway_data_policy_detections_total") == {
        (("action", "mask"), ("detector", d), ("policy", "default/no-secrets-out"), ("rule", "ids-and-cards")): 1.0
        for d in ("bank-card", "email", "china-resident-id")}
    assert samples(registry, "llm_gateway_data_policy_requests_total") == {
        (("action", "mask"), ("policy", "default/no-secrets-out"), ("rule", "ids-and-cards")): 1.0}


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/v1/chat/completions", chat(f"key {SECRET}"), "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "1", "type": "function", "function": {"name": "f", "arguments": json.dumps({"t": "ACME-123456"})}}]}]},
     "tool_calls"),
    ("/v1/completions", {"model": "qwen-turbo", "prompt": [f"x {SECRET}"]}, "prompt"),
    ("/v1/embeddings", {"model": "text-embedding-v3", "input": f"Bearer {SECRET}"}, "input"),
])
def test_block_answers_400_naming_rule_and_detector_never_the_value(path, body, field):
    processor, registry = gateway()
    (answer,) = send(processor, body, path=path)
    status, error, headers, details = error_of(answer)
    assert status == 400 and details == "llm_gateway_content_policy_violation"
    assert error["error"]["type"] == "invalid_request_error" and error["error"]["code"] == "content_policy_violation"
    assert "data policy default/no-secrets-out, rule credentials: detector" in error["error"]["message"]
    meta = metadata(answer)
    assert (meta["data_rule"], meta["data_action"]) == ("credentials", "block")
    everything = answer.SerializeToString() + generate_latest(registry)
    for value in (SECRET, "ACME-123456", "0123456789abcdef"):
        assert value.encode() not in everything
    assert samples(registry, "llm_gateway_data_policy_requests_total")[
        (("action", "block"), ("policy", "default/no-secrets-out"), ("rule", "credentials"))] == 1.0


def test_log_forwards_unchanged_and_is_counted():
    processor, registry = gateway()
    headers, body = send(processor, chat("connect to 10.1.2.3 please"))
    assert json.loads(body.request_body.response.body_mutation.body)["messages"][0]["content"] == \
        "connect to 10.1.2.3 please"
    assert metadata(headers)["data_action"] == "log"
    assert samples(registry, "llm_gateway_data_policy_requests_total") == {
        (("action", "log"), ("policy", "default/no-secrets-out"), ("rule", "addresses")): 1.0}


@pytest.mark.parametrize(("path", "body", "expected"), [
    ("/v1/completions", {"model": "m", "prompt": f"mail {EMAIL}"}, {"prompt": "mail [EMAIL]"}),
    ("/v1/completions", {"model": "m", "prompt": ["a", f"{CARD}", [1, 2]]},
     {"prompt": ["a", "[BANK-CARD]", [1, 2]]}),
    ("/v1/embeddings", {"model": "m", "input": [f"{EMAIL}", "plain"]}, {"input": ["[EMAIL]", "plain"]}),
])
def test_mask_on_completions_and_embeddings(path, body, expected):
    processor, _ = gateway()
    _, answer = send(processor, body, path=path)
    sent = json.loads(answer.request_body.response.body_mutation.body)
    assert {k: sent[k] for k in expected} == expected


def test_a_route_without_a_policy_gets_the_same_answers_as_before():
    request = chat(f"card {CARD} {SECRET}")
    with_policy, _ = gateway()
    without, _ = gateway("")
    assert table().protection.guard("default/moonshot", None) is None
    assert [a.SerializeToString() for a in send(with_policy, request, MOONSHOT)] == \
        [a.SerializeToString() for a in send(without, request, MOONSHOT)]


def test_nothing_found_adds_nothing_to_the_answers():
    processor, registry = gateway()
    headers, body = send(processor, chat("hello there"))
    assert not any(k.startswith("data_") for k in metadata(headers))
    assert samples(registry, "llm_gateway_data_policy_requests_total") == {}


JUDGED = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: judged}
spec:
  rules:
  - name: private-judge
    detectors: [{judge: {host: api.moonshot.cn, timeout: 1s, failOpen: FAIL_OPEN}}]
    action: block
"""


@pytest.mark.parametrize(("fail_open", "status"), [("false", 503), ("true", None)])
def test_without_a_judge_client_a_judge_is_unavailable_and_its_rule_decides(fail_open, status):
    """A processor with no client to ask judges with (the data plane always has one: see
    test_judge_client.py) answers at once, every judgement `unavailable`: failOpen decides."""
    processor, registry = gateway(JUDGED.replace("FAIL_OPEN", fail_open))
    answers = send(processor, chat("hello"))
    if status is None:
        assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body"]
    else:
        code, error, _, _ = error_of(answers[0])
        assert code == status and error["error"]["code"] == "data_policy_judge_unavailable"
        assert error["error"]["type"] == "server_error"
    assert samples(registry, "llm_gateway_data_policy_judgements_total") == {
        (("answer", "unavailable"), ("policy", "default/judged"), ("rule", "private-judge")): 1.0}


ANSWERS_CHECKED = POLICY.replace("    action: log\n", "    action: log\n  responses: {check: true}\n")


@pytest.mark.parametrize(("config", "path", "body", "checked"), [
    pytest.param(ANSWERS_CHECKED, "/v1/chat/completions", chat("hello"), True, id="chat"),
    pytest.param(ANSWERS_CHECKED, "/v1/chat/completions", {**chat("hello"), "stream": True}, True, id="chat-stream"),
    pytest.param(ANSWERS_CHECKED, "/v1/completions", {"model": "m", "prompt": "hello"}, True, id="completions"),
    pytest.param(ANSWERS_CHECKED, "/v1/embeddings", {"model": "m", "input": "hello"}, False,
                 id="embeddings-carry-no-text"),
    pytest.param(POLICY, "/v1/chat/completions", chat("hello"), False, id="prompts-only"),
])
def test_a_request_whose_answer_a_policy_checks_is_marked_for_the_answer_filter(config, path, body, checked):
    processor, _ = gateway(config)
    headers, _ = send(processor, body, path=path)
    mutation = headers.request_headers.response.header_mutation
    marked = {o.header.key: o.header.raw_value for o in mutation.set_headers}.get("x-llm-gateway-answer")
    entries = metadata(headers)
    if checked:
        assert marked == b"1"
        assert entries["check_answer"] is True and entries["client_stream"] is body.get("stream", False)
    else:
        assert marked is None and "check_answer" not in entries and "client_stream" not in entries
    # another route (no policy): never marked
    headers, _ = send(processor, body, host=MOONSHOT, path=path)
    assert "check_answer" not in metadata(headers)
