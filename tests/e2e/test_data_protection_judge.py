"""A data policy's private judge asked on the request path, through a real Envoy: a fake
in-cluster model (the HTTPS fake provider behind its own host, certificate and key) answers YES,
NO, garbage, or never; the request waits for it (each judgement bounded by the rule's timeout)
and is then refused, forwarded (masked where a pattern rule says so), or refused or forwarded as
the rule's `failOpen` says when the judge failed. Counted by answer; never the prompt in a log."""

from __future__ import annotations

import json

import pytest

from extproc.demo.fake_provider import FakeProvider
from extproc.policy.data_protection.judge import JUDGE_INSTRUCTIONS
from support.helpers import seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
JUDGE_HOST = "guard-llm.ai.svc"
JUDGE_KEY = "sk-judge-in-cluster-7f3a9c"
CONFIG = f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: guard-llm, namespace: default}}
spec:
  host: {JUDGE_HOST}
  configs: {{defaultConfig: {{openAIConfig: {{model: qwen2-7b-guard, apiKey: {JUDGE_KEY}}}}}}}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {{name: judged-closed, namespace: default}}
spec:
  hosts: [{DASHSCOPE}]
  rules:
  - name: cards
    detectors: [{{builtin: bank-card}}]
    action: mask
  - name: credentials
    detectors: [{{builtin: secret}}]
    action: block
  - name: private-judge
    detectors: [{{judge: {{host: {JUDGE_HOST}, timeout: 1s, failOpen: false}}}}]
    action: block
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {{name: judged-open, namespace: default}}
spec:
  hosts: [{MOONSHOT}]
  rules:
  - name: lenient-judge
    detectors: [{{judge: {{host: {JUDGE_HOST}, timeout: 1s, failOpen: true}}}}]
    action: block
"""
PROMPT = "Our Q3 revenue before the announcement is 12.5M; card 4111 1111 1111 1111"


@pytest.fixture(scope="module")
def judge(ca):
    cert = ca.issue([JUDGE_HOST])
    fake = FakeProvider("judge", cert.cert_file, cert.key_file, api_key=JUDGE_KEY).start()
    yield fake
    fake.stop()


@pytest.fixture
def gw(tmp_path, gateway_factory, judge):
    judge.clear()
    judge.reply, judge.delay_s = None, 0.0
    config = seed_dir(tmp_path, "01", "04")
    (config / "10-judge.yaml").write_text(CONFIG)
    yield gateway_factory(config, ["--resolve", f"{JUDGE_HOST}=127.0.0.1:{judge.port}"])
    judge.reply, judge.delay_s = None, 0.0


def ask(gw, judge, host: str, reply: str, delay: float = 0.0, content: str = PROMPT):
    judge.reply, judge.delay_s = reply, delay
    return gw.request(host, {"messages": [{"role": "user", "content": content}]})


@pytest.mark.parametrize(("reply", "delay", "closed", "open_"), [
    pytest.param("YES", 0, 400, 400, id="yes"),
    pytest.param("no.", 0, 200, 200, id="no"),
    pytest.param("Well, it depends on the context.", 0, 503, 200, id="garbage"),
    pytest.param("NO", 3, 503, 200, id="never"),
])
def test_the_judges_answer_decides(gw, judge, fresh_providers, reply, delay, closed, open_):
    """Per answer: a rule that fails closed (DashScope's) and one that fails open (Moonshot's)."""
    resp = ask(gw, judge, DASHSCOPE, reply, delay)
    assert resp.status == closed, resp.body
    if closed == 200:  # forwarded once the judge said NO, the card masked by the pattern rule
        assert fresh_providers[DASHSCOPE].requests[-1].body["messages"][0]["content"].endswith("card [BANK-CARD]")
    else:
        error = resp.json()["error"]
        assert fresh_providers[DASHSCOPE].requests == []
        assert "data policy default/judged-closed, rule private-judge" in error["message"]
        expected = (("invalid_request_error", "content_policy_violation") if closed == 400
                    else ("server_error", "data_policy_judge_unavailable"))
        assert (error["type"], error["code"]) == expected
    resp = ask(gw, judge, MOONSHOT, reply, delay)
    assert resp.status == open_, resp.body
    assert len(fresh_providers[MOONSHOT].requests) == (1 if open_ == 200 else 0)

    # what the judge was asked: the fixed question, the prompt between markers, over TLS with its key
    asked = judge.requests[0]
    assert asked.sni == JUDGE_HOST and asked.headers["authorization"] == f"Bearer {JUDGE_KEY}"
    assert asked.body["model"] == "qwen2-7b-guard" and asked.body["max_tokens"] == 2
    assert asked.body["messages"][0] == {"role": "system", "content": JUDGE_INSTRUCTIONS}
    assert asked.body["messages"][1]["content"] == f"<<<BEGIN TEXT>>>\n{PROMPT}\n<<<END TEXT>>>"

    answer = {"YES": "yes", "no.": "no", "NO": "timeout"}.get(reply, "garbage")
    judgements = wait_until(lambda: {dict(labels)["rule"]: v for (name, labels), v in gw.metrics().items()
                                     if name == "llm_gateway_data_policy_judgements_total"
                                     and dict(labels)["answer"] == answer} or None, 10)
    assert judgements == {"private-judge": 1.0, "lenient-judge": 1.0}
    wait_until(lambda: len(gw.access_entries()) >= 2, 10, gw.log)
    first = gw.access_entries()[0]  # DashScope's request
    assert first["status"] == closed
    if closed != 200:
        assert (first["data_rule"], first["data_action"]) == ("private-judge", "block")
    else:
        assert (first["data_rule"], first["data_action"]) == ("cards", "mask")
    for where in (gw.log(), json.dumps(gw.access_entries())):
        assert "12.5M" not in where and "4111" not in where


def test_a_request_the_patterns_block_is_not_judged(gw, judge):
    resp = ask(gw, judge, DASHSCOPE, "NO", content="my key is sk-live-9f8e7d6c5b4a39281706f5e4d3c2b1a0")
    assert resp.status == 400 and resp.json()["error"]["message"].endswith(
        "rule credentials: detector secret found sensitive data in the prompt")
    assert judge.requests == []


def test_requests_wait_for_their_own_judgement_side_by_side(gw, judge, fresh_providers):
    """Several requests judged at once (the judge slow): each gets its own answer."""
    from concurrent.futures import ThreadPoolExecutor

    from support.helpers import Gateway

    judge.reply, judge.delay_s = "NO", 0.5

    def one(i: int) -> int:
        own = Gateway(gw.process, gw.listen_port, gw.admin_port, gw.log_file)
        return own.request(DASHSCOPE, {"messages": [{"role": "user", "content": f"question {i}"}]}).status

    with ThreadPoolExecutor(4) as pool:
        assert list(pool.map(one, range(4))) == [200] * 4
    assert len(judge.requests) == 4 and len(fresh_providers[DASHSCOPE].requests) == 4
