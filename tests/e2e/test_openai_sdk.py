"""The official `openai` Python SDK as the client, configured as an application in the mesh would
be: through the gateway as its HTTP proxy (the base URL names the provider), or at the gateway's
address with a `Host` header. A real Envoy, the real ext_proc and local HTTPS fake providers."""

from __future__ import annotations

import openai
import pytest

from extproc.demo.fake_provider import count_tokens, fake_embedding
from support.helpers import seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
HELLO = [{"role": "user", "content": "Please introduce yourself."}]

# The seed's DashScope provider, with our extension: the model embeddings are sent with.
DASHSCOPE_WITH_EMBEDDINGS = """apiVersion: istio.alibabacloud.com/v1beta1
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
        embeddingModel: text-embedding-v3
        apiKey: ${YOUR_DASHSCOPE_API_KEY}
"""


@pytest.fixture
def gw(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "04", "05", "06")
    (config / "01-LLMProvider.yaml").write_text(DASHSCOPE_WITH_EMBEDDINGS)
    return gateway_factory(config)


def via_proxy(gw, base_url: str) -> openai.OpenAI:
    """An application whose HTTP proxy is the gateway (as `curl -x`): the SDK's own base URL."""
    # the SDK's own HTTP client with a proxy, as its documentation shows
    http = openai.DefaultHttpxClient(proxy=f"http://127.0.0.1:{gw.listen_port}", timeout=30)
    # the key is a placeholder: the gateway replaces it with the provider's
    return openai.OpenAI(base_url=base_url, api_key="sk-placeholder", http_client=http, max_retries=0)


def via_host_header(gw, host: str) -> openai.OpenAI:
    """An application pointed at the gateway's address, naming the route's host in `Host`."""
    return openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="sk-placeholder",
                         default_headers={"Host": host}, max_retries=0, timeout=30)


def test_chat_streamed_and_not(gw, fresh_providers, keys):
    client = via_proxy(gw, f"http://{DASHSCOPE}/compatible-mode/v1")
    answer = client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert answer.model == "qwen1.5-72b-chat"
    assert answer.choices[0].message.content == "Hello! I am qwen1.5-72b-chat, served by dashscope."
    assert answer.usage.prompt_tokens == 3 and answer.usage.completion_tokens == 7

    stream = client.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "Hello! I am qwen1.5-72b-chat, served by dashscope."
    assert chunks[-1].usage.completion_tokens == 7  # the usage event the gateway asked for

    plain, streamed = fresh_providers[DASHSCOPE].requests
    assert plain.path == streamed.path == "/compatible-mode/v1/chat/completions"
    assert streamed.body["stream"] is True and streamed.body["stream_options"] == {"include_usage": True}
    assert streamed.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"


def test_embeddings_with_the_configured_model(gw, fresh_providers, keys):
    client = via_proxy(gw, f"http://{DASHSCOPE}/compatible-mode/v1")
    texts = ["hello world", "the gateway answers embeddings"]
    result = client.embeddings.create(model="text-embedding-3-small", input=texts)
    # the SDK asked for base64 and decoded it; the vectors are the fake's, exactly
    assert [e.embedding for e in result.data] == [fake_embedding(t) for t in texts]
    assert result.model == "text-embedding-v3"
    assert result.usage.prompt_tokens == sum(count_tokens(t) for t in texts)

    (seen,) = fresh_providers[DASHSCOPE].requests
    assert seen.path == "/compatible-mode/v1/embeddings"
    assert seen.body["model"] == "text-embedding-v3" and seen.body["input"] == texts
    assert seen.body["encoding_format"] == "base64"
    assert seen.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
    assert seen.sni == DASHSCOPE


def test_embeddings_and_completions_through_a_weighted_route(gw, fresh_providers):
    client = via_host_header(gw, "demo-llm-server")
    models_seen = set()
    for _ in range(40):
        result = client.embeddings.create(model="client-embedder", input="one two three", encoding_format="float")
        assert result.data[0].embedding == fake_embedding("one two three")
        models_seen.add(result.model)
    # DashScope uses its configured embedding model, Moonshot (none configured) the client's
    assert models_seen == {"text-embedding-v3", "client-embedder"}
    assert {r.path for r in fresh_providers[MOONSHOT].requests} == {"/v1/embeddings"}
    assert {r.path for r in fresh_providers[DASHSCOPE].requests} == {"/compatible-mode/v1/embeddings"}

    completion = client.completions.create(model="qwen-completer", prompt="Say hello")
    assert completion.model == "qwen-completer"  # the client's model: no config names one for completions
    assert completion.choices[0].text.startswith("Hello! I am qwen-completer")
    assert completion.usage.prompt_tokens == 2

    streamed = list(client.completions.create(model="qwen-completer", prompt="Say hello", stream=True))
    text = "".join(c.choices[0].text for c in streamed if c.choices)
    assert text.strip() in {"Hello! I am qwen-completer, served by dashscope.",
                            "Hello! I am qwen-completer, served by moonshot."}
    assert streamed[-1].usage.completion_tokens == count_tokens(text)
    last = (fresh_providers[DASHSCOPE].requests + fresh_providers[MOONSHOT].requests)
    completions = [r for r in last if r.path.endswith("/completions") and not r.path.endswith("chat/completions")]
    assert len(completions) == 2 and all(r.body["model"] == "qwen-completer" for r in completions)


def test_models_list_from_the_config_without_a_provider_call(gw, fresh_providers):
    models = via_host_header(gw, "demo-llm-server").models.list()
    assert [(m.id, m.owned_by) for m in models] == [
        ("qwen1.5-72b-chat", DASHSCOPE), ("text-embedding-v3", DASHSCOPE), ("moonshot-v1-8k", MOONSHOT)]
    direct = via_proxy(gw, f"http://{MOONSHOT}/v1").models.list()
    assert [m.id for m in direct] == ["moonshot-v1-8k"]
    assert all(fake.requests == [] for fake in fresh_providers.values())


def test_errors_surface_as_the_sdks_exceptions(gw, fresh_providers):
    client = via_proxy(gw, f"http://{DASHSCOPE}/compatible-mode/v1")
    with pytest.raises(openai.RateLimitError) as limited:
        client.chat.completions.create(model="m", messages=HELLO, extra_headers={"x-fake-status": "429"})
    assert limited.value.status_code == 429 and limited.value.code == "fake_error"
    assert "429" in limited.value.message

    with pytest.raises(openai.APIStatusError) as failed:
        client.embeddings.create(model="m", input="x", extra_headers={"x-fake-status": "500"})
    assert failed.value.status_code == 500 and isinstance(failed.value, openai.InternalServerError)

    # the gateway's own answers: our code and message, readable from the SDK's exception
    with pytest.raises(openai.BadRequestError) as bad:
        client.embeddings.create(model="m", input="")
    assert bad.value.code == "invalid_input"
    # as docs/api.md shows it: the SDK's message leads with the status, the gateway's words are the body's
    assert bad.value.body["message"] == "'input' must be a non-empty string or array"
    assert bad.value.message.startswith("Error code: 400 - ")
    with pytest.raises(openai.NotFoundError) as unknown:
        via_proxy(gw, "http://unknown.example.com/v1").models.list()
    assert unknown.value.code == "unknown_host" and "unknown.example.com" in unknown.value.message
    with pytest.raises(openai.NotFoundError) as no_endpoint:
        client.images.generate(prompt="a cat")
    assert no_endpoint.value.code == "unknown_endpoint" and "GET .../models" in no_endpoint.value.message
    assert len(fresh_providers[DASHSCOPE].requests) == 2  # the two the provider answered with errors


def test_usage_of_each_operation_in_metrics_and_access_log(gw, fresh_providers):
    client = via_proxy(gw, f"http://{DASHSCOPE}/compatible-mode/v1")
    client.embeddings.create(model="e", input=["alpha beta", "gamma"])
    client.completions.create(model="c", prompt="one two three")
    client.chat.completions.create(model="m", messages=HELLO)
    client.models.list()
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model="e", input=[])
    with pytest.raises(openai.NotFoundError):  # retrieving one model: not supported, counted as models
        client.models.retrieve("qwen1.5-72b-chat")

    def logged():
        entries = gw.access_entries()
        return entries if len(entries) >= 6 else None

    entries = {(e["operation"], e["status"]): e
               for e in wait_until(logged, 10, lambda: f"access log: {gw.access_entries()}")}
    assert entries[("embeddings", 400)]["details"] == "llm_gateway_invalid_input"
    assert entries[("models", 404)]["details"] == "llm_gateway_unknown_endpoint"
    entries = {op: e for (op, status), e in entries.items() if status == 200}
    assert entries["embeddings"]["prompt_tokens"] == 3 and entries["embeddings"]["completion_tokens"] is None
    assert entries["embeddings"]["request_model"] == "text-embedding-v3"
    assert entries["text_completion"]["prompt_tokens"] == 3
    assert entries["text_completion"]["completion_tokens"] == count_tokens("Hello! I am c, served by dashscope.")
    assert entries["chat"]["prompt_tokens"] == 3
    assert entries["models"]["status"] == 200 and entries["models"]["route"] == "default/dashscope-qwen"

    def token_sums():
        metrics = gw.metrics()
        sums = {dict(labels)["gen_ai_operation_name"]: value for (name, labels), value in metrics.items()
                if name == "gen_ai_client_token_usage_sum" and dict(labels)["gen_ai_token_type"] == "input"}
        return sums if len(sums) == 3 else None

    assert wait_until(token_sums, 10) == {"embeddings": 3, "text_completion": 3, "chat": 3}
    requests = {(dict(labels)["gen_ai_operation_name"], dict(labels)["outcome"]): value
                for (name, labels), value in gw.metrics().items() if name == "llm_gateway_requests_total"}
    assert requests == {("embeddings", "success"): 1, ("text_completion", "success"): 1, ("chat", "success"): 1,
                        ("models", "success"): 1, ("embeddings", "rejected"): 1, ("models", "rejected"): 1}
