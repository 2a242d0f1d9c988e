"""The private judge against a fake in-cluster model (the HTTPS fake provider, its certificate
from a throwaway CA, its own key): it answers YES, NO, garbage, or never; what it is asked; a
request's verdict once the answer is in; and the ext_proc answering a request's body once its
judge answered (a deferred answer), or not at all once the request is gone."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.dataplane.data_protection import PromptCheck, ProtectionMetrics
from extproc.dataplane.judge_client import JudgeClient
from extproc.demo.ca import ThrowawayCA
from extproc.demo.fake_provider import FakeProvider
from extproc.errors import GatewayError
from extproc.policy.data_protection.judge import JUDGE_INSTRUCTIONS, Judgement, JudgeSpec
from extproc.policy.openai_api import CHAT

JUDGE_HOST = "private-llm.ai.svc"
KEY = "sk-judge-key-0123456789"
CONFIG = f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: private-llm}}
spec:
  host: {JUDGE_HOST}
  configs: {{defaultConfig: {{openAIConfig: {{model: qwen2-7b-guard, apiKey: {KEY}}}}}}}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {{name: judged}}
spec:
  rules:
  - name: cards
    detectors: [{{builtin: bank-card}}]
    action: mask
  - name: private-judge
    detectors: [{{judge: {{host: {JUDGE_HOST}, timeout: 1s, failOpen: FAIL_OPEN}}}}]
    action: block
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    ca = ThrowawayCA(tmp_path_factory.mktemp("judge-pki"))
    cert = ca.issue([JUDGE_HOST])
    fake = FakeProvider("judge", cert.cert_file, cert.key_file, api_key=KEY).start()
    yield ca, fake
    fake.stop()


def compiled(fail_open: str = "false"):
    objects, problems = load_text(CONFIG.replace("FAIL_OPEN", fail_open), "c.yaml")
    assert problems == []
    return compile_config(objects).table


def ask(model, reply: str | None, delay: float = 0.0, text: str = "hello", key_ok: bool = True,
        host: str = JUDGE_HOST) -> Judgement:
    ca, fake = model
    fake.clear()
    fake.reply, fake.delay_s = reply, delay
    fake.api_key = KEY if key_ok else "another-key"
    table = compiled()
    client = JudgeClient(lambda: table, str(ca.cert_file), {JUDGE_HOST: ("127.0.0.1", fake.port)})

    async def go():
        try:
            return await client.ask(JudgeSpec(host, None, 1.0 if delay < 5 else 0.3, False), text)
        finally:
            await client.close()

    try:
        return asyncio.run(go())
    finally:
        fake.reply, fake.delay_s, fake.api_key = None, 0.0, KEY


@pytest.mark.parametrize(("reply", "judgement"), [
    ("YES", Judgement.SENSITIVE), ("yes.", Judgement.SENSITIVE), ("  No \n", Judgement.CLEAN),
    ("NO", Judgement.CLEAN),
    ("Yes, it contains a card number.", Judgement.GARBAGE), ("maybe", Judgement.GARBAGE), ("", Judgement.GARBAGE),
    ("NOPE", Judgement.GARBAGE),
])
def test_the_answer_is_read_strictly(model, reply, judgement):
    assert ask(model, reply or " ") is judgement


def test_a_judge_that_never_answers_times_out(model):
    assert ask(model, "NO", delay=10) is Judgement.TIMEOUT


def test_a_refused_key_or_a_host_without_route_is_unavailable(model):
    assert ask(model, "NO", key_ok=False) is Judgement.UNAVAILABLE
    assert ask(model, "NO", host="nobody.example.com") is Judgement.UNAVAILABLE


def test_what_the_judge_is_asked(model):
    _, fake = model
    assert ask(model, "NO", text="the Q3 numbers are 12.5M") is Judgement.CLEAN
    (request,) = fake.requests
    assert request.sni == JUDGE_HOST and request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "qwen2-7b-guard" and body["temperature"] == 0 and body["stream"] is False
    assert body["messages"][0] == {"role": "system", "content": JUDGE_INSTRUCTIONS}
    assert body["messages"][1]["content"] == "<<<BEGIN TEXT>>>\nthe Q3 numbers are 12.5M\n<<<END TEXT>>>"


@pytest.mark.parametrize(("reply", "delay", "fail_open", "outcome"), [
    ("YES", 0, "false", 400), ("NO", 0, "false", "masked"), ("garbage!", 0, "false", 503),
    ("NO", 10, "false", 503), ("garbage!", 0, "true", "masked"), ("NO", 10, "true", "masked"),
    ("YES", 0, "true", 400),
])
def test_a_requests_verdict_with_the_judges_answer(model, reply, delay, fail_open, outcome):
    """The path the ext_proc takes once it can await: patterns first, then each judge, then finish."""
    ca, fake = model
    fake.reply, fake.delay_s = reply, delay
    table = compiled(fail_open)
    guard = table.protection.guard("default/private-llm", None)
    client = JudgeClient(lambda: table, str(ca.cert_file), {JUDGE_HOST: ("127.0.0.1", fake.port)})
    data = {"messages": [{"role": "user", "content": "pay with 4111 1111 1111 1111"}]}
    check = PromptCheck(guard, CHAT, data)
    metrics = ProtectionMetrics(CollectorRegistry())

    async def judge_all():
        try:
            for rule, spec in check.pending():
                spec = JudgeSpec(spec.host, spec.model, 0.3 if delay else 1.0, spec.fail_open)
                check.judged(rule, await client.ask(spec, check.prompt_text()), metrics)
        finally:
            await client.close()

    try:
        asyncio.run(judge_all())
    finally:
        fake.reply, fake.delay_s = None, 0.0
    if outcome == "masked":
        check.finish(metrics)
        assert data["messages"][0]["content"] == "pay with [BANK-CARD]"
    else:
        with pytest.raises(GatewayError) as refused:
            check.finish(metrics)
        assert refused.value.status == outcome
        assert "4111" not in refused.value.message


PROCESSOR_CONFIG = CONFIG + """---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope}
spec:
  host: dashscope.aliyuncs.com
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-provider}}}
"""


def judged_exchange(model, reply: str | None, delay: float, fail_open: str, on_close: bool = False):
    """The ext_proc's request messages for a chat request a judge must judge, as the lean server
    drives them: the body's answer is a Deferred, delivered once the judge answered."""
    from extproc.dataplane.deferred import Deferred
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder
    from support.ext_proc_messages import body_msg, headers_msg

    ca, fake = model
    fake.clear()
    fake.reply, fake.delay_s = reply, delay
    config = PROCESSOR_CONFIG.replace("FAIL_OPEN", fail_open).replace("timeout: 1s", "timeout: 500ms")
    objects, problems = load_text(config, "c.yaml")
    assert problems == []
    table = compile_config(objects).table
    client = JudgeClient(lambda: table, str(ca.cert_file), {JUDGE_HOST: ("127.0.0.1", fake.port)})
    processor = ExternalProcessor(TableHolder(table), judges=client,
                                  protection=ProtectionMetrics(CollectorRegistry()))

    async def go():
        exchange = processor.exchange()
        assert exchange.on_message(headers_msg("dashscope.aliyuncs.com").SerializeToString()) == ([], False)
        later, _ = exchange.on_message(body_msg({"messages": [{"role": "user", "content": "card 4111 1111 1111 1111"}]})
                                       .SerializeToString())
        assert isinstance(later, Deferred) and not later.settled
        delivered = asyncio.get_running_loop().create_future()
        assert later.bind(lambda answers, done, failure: delivered.set_result((answers, done, failure))) is None
        if on_close:  # the client went away while the judge thinks: nothing is asked for any longer
            await asyncio.sleep(0.05)
            exchange.on_close()
            await asyncio.sleep(0.8)  # past the judge's timeout: a judgement still awaited would answer by now
            assert not delivered.done()
            await client.close()
            return None
        try:
            return await asyncio.wait_for(delivered, 5)
        finally:
            exchange.on_close()
            await client.close()

    try:
        return asyncio.run(go())
    finally:
        fake.reply, fake.delay_s = None, 0.0


@pytest.mark.parametrize(("reply", "delay", "fail_open", "outcome"), [
    ("NO", 0, "false", "forwarded"), ("YES", 0, "true", 400), ("eh?", 0, "false", 503), ("eh?", 0, "true", "forwarded"),
    ("NO", 2, "false", 503), ("NO", 2, "true", "forwarded"),
])
def test_the_processor_answers_the_body_once_the_judge_answered(model, reply, delay, fail_open, outcome):
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    answers, done, failure = judged_exchange(model, reply, delay, fail_open)
    assert done and failure is None
    responses = [pb.ProcessingResponse.FromString(a) for a in answers]
    if outcome == "forwarded":
        assert [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
        body = responses[1].request_body.response.body_mutation.body
        assert b"card [BANK-CARD]" in body  # the pattern rule's mask, applied after the judgement
    else:
        (refusal,) = responses
        assert refusal.immediate_response.status.code == outcome
        assert b"4111" not in refusal.immediate_response.body


def test_a_request_gone_while_judged_is_not_answered(model):
    assert judged_exchange(model, "NO", 2, "false", on_close=True) is None
