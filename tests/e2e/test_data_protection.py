"""LLMDataPolicy through a real Envoy (`extproc up`), in front of the HTTPS fake providers: masked
prompts reach the provider with placeholders (chat strings and content arrays, tool calls,
completions, embeddings), blocked ones never reach it and get OpenAI's 400 (as the official SDK
reads it), a host without a policy is untouched, and the access log, the metrics and the logs
name rule, detector and action but never hold what was found."""

from __future__ import annotations

import json

import openai
import pytest

from support.helpers import seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
POLICY = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: no-secrets-out, namespace: default}
spec:
  hosts: [dashscope.aliyuncs.com]
  rules:
  - name: ids-and-cards
    detectors: [{builtin: china-resident-id}, {builtin: bank-card}, {builtin: email}, {builtin: phone}]
    action: mask
  - name: credentials
    detectors: [{builtin: secret}, {regex: 'ACME-[0-9]{6}', name: acme-ticket}]
    action: block
  - name: addresses
    detectors: [{builtin: ipv4}]
    action: log
"""
CARD, EMAIL, ID, PHONE = "4111 1111 1111 1111", "jane.roe@example.com", "11010519491231002X", "+86 138 0013 8000"
SECRET = "sk-live-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
CHAT_PATH = "/compatible-mode/v1/chat/completions"
COMPLETIONS_PATH, EMBEDDINGS_PATH = "/compatible-mode/v1/completions", "/compatible-mode/v1/embeddings"


@pytest.fixture
def gw(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "01", "04")
    (config / "10-data-policy.yaml").write_text(POLICY)
    return gateway_factory(config)


def sent(fake) -> dict:
    """The body the provider received last."""
    return fake.requests[-1].body


def test_mask_reaches_the_provider_with_placeholders(gw, fresh_providers):
    dashscope = fresh_providers[DASHSCOPE]
    # a chat string, echoed back by the fake: the provider saw only placeholders
    resp = gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": f"card {CARD}, mail {EMAIL}, id {ID}"}]},
                      {"x-fake-echo": "1"})
    assert resp.status == 200, resp.body
    assert resp.json()["choices"][0]["message"]["content"] == "card [BANK-CARD], mail [EMAIL], id [CHINA-RESIDENT-ID]"
    # content parts and a tool call's arguments
    resp = gw.request(DASHSCOPE, {"messages": [
        {"role": "user", "content": [{"type": "text", "text": f"call me on {PHONE}"},
                                     {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}}]},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "send_mail", "arguments": json.dumps({"to": EMAIL})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "sent"}]})
    assert resp.status == 200, resp.body
    messages = sent(dashscope)["messages"]
    assert messages[0]["content"][0] == {"type": "text", "text": "call me on [PHONE]"}
    assert messages[0]["content"][1]["image_url"]["url"] == "https://example.com/a.png"
    assert json.loads(messages[1]["tool_calls"][0]["function"]["arguments"]) == {"to": "[EMAIL]"}
    # completions and embeddings, strings and arrays
    resp = gw.request(DASHSCOPE, {"model": "qwen-turbo", "prompt": f"pay {CARD}"}, path=COMPLETIONS_PATH)
    assert resp.status == 200 and sent(dashscope)["prompt"] == "pay [BANK-CARD]"
    resp = gw.request(DASHSCOPE, {"model": "text-embedding-v3", "input": [f"{EMAIL}", "plain text"]},
                      path=EMBEDDINGS_PATH)
    assert resp.status == 200 and sent(dashscope)["input"] == ["[EMAIL]", "plain text"]
    # the access log names the rule and the action
    wait_until(lambda: len(gw.access_entries()) >= 4, 10, gw.log)
    entries = gw.access_entries()
    assert {(e["data_policy"], e["data_rule"], e["data_action"]) for e in entries} == {
        ("default/no-secrets-out", "ids-and-cards", "mask")}
    assert entries[0]["data_detectors"] == "bank-card,china-resident-id,email"


@pytest.mark.parametrize(("path", "body"), [
    (CHAT_PATH, {"messages": [{"role": "user", "content": f"my key is {SECRET}"}]}),
    (CHAT_PATH, {"messages": [{"role": "user", "content": [{"type": "text", "text": "ticket ACME-204518"}]}]}),
    (COMPLETIONS_PATH, {"model": "qwen-turbo", "prompt": [f"Authorization: Bearer {SECRET}"]}),
    (EMBEDDINGS_PATH, {"model": "text-embedding-v3", "input": f"{CARD} {SECRET}"}),
])
def test_block_never_reaches_the_provider(gw, fresh_providers, path, body):
    resp = gw.request(DASHSCOPE, body, path=path)
    assert resp.status == 400, resp.body
    assert resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "content_policy_violation")
    assert "data policy default/no-secrets-out, rule credentials: detector" in error["message"]
    assert fresh_providers[DASHSCOPE].requests == []
    wait_until(lambda: gw.access_entries(), 10, gw.log)
    (entry,) = gw.access_entries()
    assert (entry["status"], entry["data_rule"], entry["data_action"]) == (400, "credentials", "block")
    metrics = gw.metrics()
    requests = {dict(labels)["action"]: v for (name, labels), v in metrics.items()
                if name == "llm_gateway_data_policy_requests_total"}
    assert requests == {"block": 1.0}
    for where in (resp.body.decode(), json.dumps(entry), gw.log(), json.dumps(sorted(map(str, metrics.items())))):
        for value in (SECRET, "ACME-204518", "4111"):
            assert value not in where


def test_the_openai_sdk_reads_the_refusal(gw):
    http = openai.DefaultHttpxClient(proxy=f"http://127.0.0.1:{gw.listen_port}", timeout=30)
    client = openai.OpenAI(base_url=f"http://{DASHSCOPE}/compatible-mode/v1", api_key="sk-placeholder",
                           http_client=http, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="any", messages=[{"role": "user", "content": f"use {SECRET}"}])
    assert refused.value.code == "content_policy_violation"
    answer = client.chat.completions.create(model="any", messages=[{"role": "user", "content": f"mail {EMAIL}"}],
                                            extra_headers={"x-fake-echo": "1"})
    assert answer.choices[0].message.content == "mail [EMAIL]"


def test_log_and_a_host_without_a_policy_forward_unchanged(gw, fresh_providers):
    resp = gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "ping 10.0.0.7"}]})
    assert resp.status == 200 and sent(fresh_providers[DASHSCOPE])["messages"][0]["content"] == "ping 10.0.0.7"
    text = f"card {CARD} key {SECRET}"
    resp = gw.request(MOONSHOT, {"messages": [{"role": "user", "content": text}]})
    assert resp.status == 200 and sent(fresh_providers[MOONSHOT])["messages"][0]["content"] == text
    wait_until(lambda: len(gw.access_entries()) >= 2, 10, gw.log)
    by_host = {e["host"]: e for e in gw.access_entries()}
    assert by_host[DASHSCOPE]["data_action"] == "log" and by_host[DASHSCOPE]["data_rule"] == "addresses"
    assert by_host[MOONSHOT]["data_action"] is None
    found = {tuple(sorted(labels)): v for (name, labels), v in gw.metrics().items()
             if name == "llm_gateway_data_policy_detections_total"}
    assert found == {(("action", "log"), ("detector", "ipv4"), ("policy", "default/no-secrets-out"),
                      ("rule", "addresses")): 1.0}
