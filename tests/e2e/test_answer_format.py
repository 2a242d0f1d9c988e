"""A client that asks for a stream gets a stream; one that did not ask gets JSON, whatever the
provider config forces (docs/api.md, "Streamed or not"): the official `openai` SDK over the seed's
50/50 route (Moonshot's config says `stream: false`), a provider forced to stream, failover
between providers of both kinds, and exact token counts through it all. A real Envoy, the real
ext_proc, local HTTPS fake providers."""

from __future__ import annotations

import json

import openai
import pytest

from extproc.demo.fake_provider import count_tokens
from support.helpers import seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
HELLO = [{"role": "user", "content": "Please introduce yourself."}]
REPLIES = {"qwen1.5-72b-chat": "Hello! I am qwen1.5-72b-chat, served by dashscope.",
           "moonshot-v1-8k": "Hello! I am moonshot-v1-8k, served by moonshot."}
ROUNDS = 20


def client_for(gw, host: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="sk-placeholder",
                         default_headers={"Host": host}, max_retries=0, timeout=30)


@pytest.fixture
def seed_gw(tmp_path, gateway_factory):
    """The seed's providers and its 50/50 route, unchanged."""
    return gateway_factory(seed_dir(tmp_path, "01", "04", "05", "06"))


def _text(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_sdk_over_the_seeds_50_50_route_gets_its_own_format(seed_gw, fresh_providers):
    """20 times each: streamed with the usage event asked for, streamed without, and not streamed;
    every answer in the client's format, whichever provider the weighted pick chose."""
    client = client_for(seed_gw, "demo-llm-server")
    expected_requests = 0
    served: dict[str, set[str]] = {"usage": set(), "plain": set(), "json": set()}
    for _ in range(ROUNDS):
        chunks = list(client.chat.completions.create(model="any", messages=HELLO, stream=True,
                                                     stream_options={"include_usage": True}))
        assert chunks, "a streamed request got no chunk"
        assert all(c.object == "chat.completion.chunk" for c in chunks)
        model = chunks[0].model
        assert _text(chunks).strip() == REPLIES[model]
        usage = [c for c in chunks if c.usage is not None]
        assert len(usage) == 1 and usage[0] is chunks[-1] and chunks[-1].choices == []
        assert usage[0].usage.prompt_tokens == 3
        assert usage[0].usage.completion_tokens == count_tokens(REPLIES[model])
        served["usage"].add(model)

        chunks = list(client.chat.completions.create(model="any", messages=HELLO, stream=True))
        assert chunks and all(c.object == "chat.completion.chunk" for c in chunks)
        model = chunks[0].model
        assert _text(chunks).strip() == REPLIES[model]
        if model == "moonshot-v1-8k":  # converted from Moonshot's JSON: no usage event unasked
            assert all(c.usage is None for c in chunks)
        else:  # passed through as DashScope streams it, with the usage event the gateway asks for
            assert chunks[-1].usage.completion_tokens == count_tokens(REPLIES[model])
        served["plain"].add(model)

        answer = client.chat.completions.create(model="any", messages=HELLO)
        assert answer.object == "chat.completion"
        assert answer.choices[0].message.content == REPLIES[answer.model]
        assert answer.usage.completion_tokens == count_tokens(REPLIES[answer.model])
        served["json"].add(answer.model)
        expected_requests += 3
    # both providers answered each kind of request (each half the time: 2**-19 to miss one)
    assert all(models == set(REPLIES) for models in served.values()), served
    # what each provider was asked: Moonshot always JSON (its config), DashScope the client's format
    assert all(r.body["stream"] is False and "stream_options" not in r.body
               for r in fresh_providers[MOONSHOT].requests)
    assert any(r.body.get("stream") is True for r in fresh_providers[DASHSCOPE].requests)
    assert len(fresh_providers[MOONSHOT].requests) + len(fresh_providers[DASHSCOPE].requests) == expected_requests


def test_raw_event_stream_of_a_converted_answer(seed_gw, fresh_providers):
    """What a non-SDK client reads: `text/event-stream`, `data:` events, `[DONE]` last; and the
    access log and metrics count the converted answer's tokens exactly."""
    for _ in range(60):  # until the weighted pick gave Moonshot (JSON, converted)
        fresh_providers[MOONSHOT].clear()
        response = seed_gw.request("demo-llm-server", {"messages": HELLO, "stream": True,
                                                       "stream_options": {"include_usage": True}},
                                   path="/v1/chat/completions")
        if fresh_providers[MOONSHOT].requests:
            break
    else:
        pytest.fail("the 50/50 route never picked Moonshot")
    assert response.status == 200
    assert response.headers["content-type"] == "text/event-stream"
    events = [block for block in response.body.decode().split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(block[len("data: "):]) for block in events[:-1]]
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == \
        REPLIES["moonshot-v1-8k"]
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}
    assert all("usage" in c and c["usage"] is None for c in chunks[:-1])  # as OpenAI's chunks say it

    entry = wait_until(lambda: [e for e in seed_gw.access_entries() if e["provider"] == "default/moonshot"], 10)[-1]
    assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (3, 7, 10)
    assert entry["stream"] is False  # what the provider was asked: its answer's timings are the provider's

    def counted():
        samples = seed_gw.metrics()
        return sum(v for (name, labels), v in samples.items() if name == "gen_ai_client_token_usage_sum"
                   and ("gen_ai_response_model", "moonshot-v1-8k") in labels)
    assert wait_until(counted, 10) == 10


FORCED_STREAM = """apiVersion: istio.alibabacloud.com/v1beta1
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
        stream: true
        apiKey: ${YOUR_DASHSCOPE_API_KEY}
"""


def test_a_provider_forced_to_stream_answers_json_to_a_client_that_did_not_ask(tmp_path, gateway_factory,
                                                                                fresh_providers):
    config = seed_dir(tmp_path)
    (config / "01-LLMProvider.yaml").write_text(FORCED_STREAM)
    gw = gateway_factory(config)
    client = client_for(gw, DASHSCOPE)
    answer = client.chat.completions.create(model="any", messages=HELLO)
    assert answer.object == "chat.completion"
    assert answer.choices[0].message.content.strip() == REPLIES["qwen1.5-72b-chat"]
    assert answer.choices[0].finish_reason == "stop"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (3, 7)
    (sent,) = fresh_providers[DASHSCOPE].requests
    assert sent.body["stream"] is True and sent.body["stream_options"] == {"include_usage": True}

    # a client that asked for the stream gets it as the provider sends it
    chunks = list(client.chat.completions.create(model="any", messages=HELLO, stream=True))
    assert _text(chunks).strip() == REPLIES["qwen1.5-72b-chat"]

    # an error event mid-stream: the JSON client gets the error, not half an answer
    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="any", messages=HELLO, extra_headers={"x-fake-stream-error": "1"})
    assert failed.value.status_code == 502
    assert failed.value.body["message"] == "the model failed mid-stream"

    entries = wait_until(lambda: len(gw.access_entries()) == 3 and gw.access_entries(), 10)
    assert [(e["prompt_tokens"], e["completion_tokens"]) for e in entries[:2]] == [(3, 7), (3, 7)]
    assert entries[2]["stream_error"] == "server_error"


def test_provider_errors_reach_a_streaming_client_as_the_provider_sent_them(seed_gw, fresh_providers):
    """An error is never converted: the SDK raises it as it would from OpenAI."""
    client = client_for(seed_gw, MOONSHOT)
    with pytest.raises(openai.RateLimitError) as limited:
        list(client.chat.completions.create(model="any", messages=HELLO, stream=True,
                                            extra_headers={"x-fake-status": "429"}))
    assert limited.value.body["code"] == "fake_error"


RETRY_ROUTE = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: failover-mixed
spec:
  host: mixed-llm
  rules:
  - name: main
    backendRefs:
    - {{providerHost: {first}, weight: 100}}
    - {{providerHost: {second}, weight: 0}}
    retries:
      attempts: 1
      retryOn: [5xx]
"""


@pytest.mark.parametrize(("first", "second", "fail"), [
    pytest.param(DASHSCOPE, MOONSHOT, "dashscope:503", id="streams-then-json"),
    pytest.param(MOONSHOT, DASHSCOPE, "moonshot:503", id="json-then-streams"),
])
def test_failover_keeps_the_clients_format(tmp_path, gateway_factory, fresh_providers, first, second, fail):
    """The first attempt fails; the retry goes to a provider with another `stream` setting. The
    client's format holds, streamed and not, and the retry asks its provider for the client's
    format where its config sets none (DashScope)."""
    config = seed_dir(tmp_path, "01", "04")
    (config / "07-route.yaml").write_text(RETRY_ROUTE.format(first=first, second=second))
    gw = gateway_factory(config)
    client = client_for(gw, "mixed-llm")
    failing = {"x-fake-fail": fail}
    chunks = list(client.chat.completions.create(model="any", messages=HELLO, stream=True, extra_headers=failing,
                                                 stream_options={"include_usage": True}))
    model = "moonshot-v1-8k" if second == MOONSHOT else "qwen1.5-72b-chat"
    assert chunks and chunks[0].model == model and _text(chunks).strip() == REPLIES[model]
    assert chunks[-1].usage.completion_tokens == count_tokens(REPLIES[model])

    answer = client.chat.completions.create(model="any", messages=HELLO, extra_headers=failing)
    assert answer.object == "chat.completion" and answer.choices[0].message.content == REPLIES[model]

    retried = fresh_providers[second].requests
    assert len(retried) == 2
    if second == DASHSCOPE:  # no config `stream`: the client's own, not Moonshot's false
        assert [r.body["stream"] for r in retried] == [True, False]
        assert "stream_options" not in retried[1].body
    entries = wait_until(lambda: len([e for e in gw.access_entries() if e.get("kind") != "attempt"]) == 2
                         and gw.access_entries(), 10)
    finals = [e for e in entries if e.get("kind") != "attempt"]
    assert [e["tried"] for e in finals] == [first, first]
    assert all(e["completion_tokens"] == count_tokens(REPLIES[model]) for e in finals)
