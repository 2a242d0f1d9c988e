"""LLMDataPolicy on answers (`responses.check`) through a real Envoy, in front of the HTTPS fake
providers, which answer what `x-fake-reply` says (streamed one word per event): a card number
split across events is masked in a stream that stays incremental, a secret mid-stream ends the
stream with `finish_reason: content_filter` and an error event (as the official SDK reads it),
JSON answers are masked or replaced by the error, answers converted to the client's format are
checked too, and requests whose policies do not check answers never reach the answer filter.
The access log and the metrics name rule and action, never what was found."""

from __future__ import annotations

import http.client
import json
import re
import time

import openai
import pytest

from support.helpers import seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
POLICIES = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: answers-too, namespace: default}
spec:
  hosts: [dashscope.aliyuncs.com]
  rules:
  - name: cards-and-mail
    detectors: [{builtin: bank-card}, {builtin: email}]
    action: mask
  - name: credentials
    detectors: [{builtin: secret}]
    action: block
  - name: addresses
    detectors: [{builtin: ipv4}]
    action: log
  responses: {check: true}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: prompts-only, namespace: default}
spec:
  hosts: [api.moonshot.cn]
  rules:
  - name: cards
    detectors: [{builtin: bank-card}]
    action: mask
"""
CARD, EMAIL, SECRET = "4111 1111 1111 1111", "jane.roe@example.com", "sk-live-9f8e7d6c5b4a39281706f5e4d3c2b1a0"
ASK = [{"role": "user", "content": "What do you have on file?"}]
# long enough that the client reads it while the provider still streams (the scanner holds back
# only the longest span a pattern can examine: a few hundred bytes with an email pattern)
FILLER = " ".join(f"word{i}" for i in range(90))


@pytest.fixture
def gw(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "01", "04")
    (config / "10-data-policies.yaml").write_text(POLICIES)
    return gateway_factory(config)


def stream(gw, host: str, reply: str, headers: dict[str, str] | None = None):
    """A streamed chat request; (status, [(arrival time, raw bytes)], the events' data)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.listen_port, timeout=30)
    body = json.dumps({"messages": ASK, "stream": True})
    conn.request("POST", f"http://{host}/", body=body, headers={
        "content-type": "application/json", "x-fake-reply": reply, **(headers or {})})
    resp = conn.getresponse()
    chunks = []
    while data := resp.read1(65536):
        chunks.append((time.time(), data))
    conn.close()
    raw = b"".join(c for _, c in chunks).decode()
    events = [block[len("data: "):] for block in raw.split("\n\n") if block.startswith("data: ")]
    return resp.status, chunks, [e if e == "[DONE]" else json.loads(e) for e in events]


def text_of(events: list) -> str:
    return "".join(c["delta"].get("content") or "" for e in events if isinstance(e, dict) and "choices" in e
                   for c in e["choices"])


def answer_filter_streams(gw) -> int:
    """How many answers Envoy's answer filter sent to the ext_proc (its own stats)."""
    stats = gw.admin("/stats?filter=answer")
    found = re.search(r"ext_proc\.answer\.streams_started: (\d+)", stats)
    return int(found.group(1)) if found else 0


def test_a_card_split_across_events_is_masked_and_the_stream_stays_incremental(gw, fresh_providers):
    reply = f"{FILLER} your card {CARD} and mail {EMAIL} are on file, from 10.1.2.3"
    status, chunks, events = stream(gw, DASHSCOPE, reply, {"x-fake-event-delay": "0.02"})
    assert status == 200
    sent = fresh_providers[DASHSCOPE].requests[-1]
    # the card came in four events ("4111 ", "1111 ", ...): masked whole all the same
    assert text_of(events).split() == f"{FILLER} your card [BANK-CARD] and mail [EMAIL] are on file, from 10.1.2.3"\
        .split()
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == len(reply.split())
    assert [c["finish_reason"] for e in events[:-1] for c in e["choices"] if c["finish_reason"]] == ["stop"]
    # incremental: the client read text while the provider still sent its events
    first_text = next(at for at, data in chunks if re.search(rb'"content":"[^"]', data))
    assert first_text < sent.event_times[-1], (first_text, sent.event_times[-1])
    assert len(chunks) > 10
    wait_until(lambda: gw.access_entries(), 10, gw.log)
    (entry,) = gw.access_entries()
    assert entry["data_answer"] == {"policy": "default/answers-too", "rule": "cards-and-mail", "action": "mask",
                                    "detectors": "bank-card,email,ipv4"}
    assert entry["data_action"] is None  # the prompt held nothing
    assert entry["completion_tokens"] == len(reply.split())  # the provider's own usage, read by Envoy
    samples = gw.metrics()
    found = {(dict(labels)["rule"], dict(labels)["detector"]): v for (name, labels), v in samples.items()
             if name == "llm_gateway_data_policy_answer_detections_total"}
    assert found == {("cards-and-mail", "bank-card"): 1.0, ("cards-and-mail", "email"): 1.0,
                     ("addresses", "ipv4"): 1.0}
    answers = {(dict(labels)["rule"], dict(labels)["action"]): v for (name, labels), v in samples.items()
               if name == "llm_gateway_data_policy_answers_total"}
    assert answers == {("cards-and-mail", "mask"): 1.0}
    for where in (json.dumps(entry), gw.log(), json.dumps(sorted(map(str, samples.items())))):
        assert "4111" not in where and EMAIL not in where


def test_a_secret_mid_stream_ends_it_with_content_filter_and_an_error(gw, fresh_providers):
    """What the official SDK reads: the text before the secret, a chunk finished by the content
    filter, then the error event raised as an APIError with OpenAI's code."""
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="sk-placeholder",
                           default_headers={"Host": DASHSCOPE}, max_retries=0, timeout=30)
    reply = f"{FILLER} the key is {SECRET} and that is all you need to know"
    chunks = []
    with pytest.raises(openai.APIError) as ended:
        for chunk in client.chat.completions.create(model="any", messages=ASK, stream=True,
                                                    extra_headers={"x-fake-reply": reply}):
            chunks.append(chunk)
    assert ended.value.code == "content_policy_violation"
    assert "data policy default/answers-too, rule credentials: detector secret" in ended.value.message
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert SECRET not in text and "sk-live" not in text and "that is all" not in text
    assert text.startswith("word0 word1")
    assert chunks[-1].choices[0].finish_reason == "content_filter"
    # the same as raw events: nothing after the error event
    status, _, events = stream(gw, DASHSCOPE, reply)
    assert status == 200
    assert events[-1] == {"error": {"message": ended.value.message, "type": "invalid_request_error",
                                    "code": "content_policy_violation"}}
    assert events[-2]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "content_filter"}]
    wait_until(lambda: len(gw.access_entries()) >= 2, 10, gw.log)
    assert [e["data_answer"]["action"] for e in gw.access_entries()] == ["block", "block"]
    assert all(SECRET not in json.dumps(e) for e in gw.access_entries()) and SECRET not in gw.log()


def test_json_answers_are_masked_or_replaced_by_the_error(gw):
    resp = gw.request(DASHSCOPE, {"messages": ASK}, {"x-fake-reply": f"pay with {CARD} or mail {EMAIL}"})
    assert resp.status == 200, resp.body
    answer = resp.json()
    assert answer["choices"][0]["message"]["content"] == "pay with [BANK-CARD] or mail [EMAIL]"
    assert int(resp.headers["content-length"]) == len(resp.body)
    assert answer["usage"]["completion_tokens"] == 9  # the rest of the answer as the provider sent it

    resp = gw.request(DASHSCOPE, {"messages": ASK}, {"x-fake-reply": f"use {SECRET}"})
    assert resp.status == 400 and resp.headers["content-type"] == "application/json"
    error = resp.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "content_policy_violation")
    assert error["message"].startswith("the answer was withheld by data policy default/answers-too, rule credentials")
    assert SECRET not in resp.body.decode()

    resp = gw.request(DASHSCOPE, {"messages": ASK}, {"x-fake-reply": "nothing to see here"})
    assert resp.status == 200 and resp.json()["choices"][0]["message"]["content"] == "nothing to see here"
    wait_until(lambda: len(gw.access_entries()) >= 3, 10, gw.log)
    entries = gw.access_entries()
    assert [(e["status"], (e["data_answer"] or {}).get("action")) for e in entries] == [
        (200, "mask"), (400, "block"), (200, None)]


CONVERTED = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: dashscope-qwen
spec:
  host: dashscope.aliyuncs.com
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig:
        model: qwen1.5-72b-chat
        stream: STREAM
        apiKey: ${YOUR_DASHSCOPE_API_KEY}
"""


@pytest.mark.parametrize("forced", ["true", "false"])
def test_an_answer_converted_to_the_clients_format_is_checked_as_the_json_it_is(tmp_path, gateway_factory,
                                                                               fresh_providers, forced):
    """The provider forced to stream for a client that wants JSON (converted, then checked), or
    to answer JSON for a client that streams (checked, then converted)."""
    config = seed_dir(tmp_path)
    (config / "01-LLMProvider.yaml").write_text(CONVERTED.replace("STREAM", forced))
    (config / "10-data-policies.yaml").write_text(POLICIES)
    gw = gateway_factory(config)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="sk-placeholder",
                           default_headers={"Host": DASHSCOPE}, max_retries=0, timeout=30)
    reply = {"x-fake-reply": f"card {CARD} ok"}
    if forced == "true":
        answer = client.chat.completions.create(model="any", messages=ASK, extra_headers=reply)
        assert answer.choices[0].message.content.split() == ["card", "[BANK-CARD]", "ok"]
        with pytest.raises(openai.BadRequestError) as refused:
            client.chat.completions.create(model="any", messages=ASK, extra_headers={"x-fake-reply": SECRET})
    else:
        chunks = list(client.chat.completions.create(model="any", messages=ASK, stream=True, extra_headers=reply))
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "card [BANK-CARD] ok"
        with pytest.raises(openai.BadRequestError) as refused:  # withheld before anything was sent: JSON
            list(client.chat.completions.create(model="any", messages=ASK, stream=True,
                                                extra_headers={"x-fake-reply": SECRET}))
    assert refused.value.code == "content_policy_violation"
    assert fresh_providers[DASHSCOPE].requests[-1].body["stream"] is (forced == "true")


def test_routes_and_policies_that_do_not_check_answers_never_reach_the_answer_filter(gw, fresh_providers):
    before = answer_filter_streams(gw)
    resp = gw.request(DASHSCOPE, {"messages": ASK}, {"x-fake-reply": "fine"})  # checked: one answer stream
    assert resp.status == 200
    assert answer_filter_streams(gw) == before + 1
    # Moonshot's policy checks prompts only: its answer, card and all, passes Envoy as it comes
    resp = gw.request(MOONSHOT, {"messages": [{"role": "user", "content": f"pay {CARD}"}]},
                      {"x-fake-reply": f"card {CARD}"})
    assert resp.status == 200 and resp.json()["choices"][0]["message"]["content"] == f"card {CARD}"
    assert fresh_providers[MOONSHOT].requests[-1].body["messages"][0]["content"] == "pay [BANK-CARD]"
    assert answer_filter_streams(gw) == before + 1
