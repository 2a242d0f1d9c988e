"""Any provider behind one route, any client in front (docs/translation.md), through a real Envoy and
the real ext_proc, to local HTTPS fake providers that are as strict as the real APIs (Anthropic's
Messages API, the Gemini API, Bedrock's Converse API with its SigV4 signature and binary event
stream, Azure OpenAI, an OpenAI-compatible one): every pair of client API and provider API,
streamed and not, with exact usage in the access log, the metrics and the budgets; the official
`anthropic` and `openai` SDKs as clients; a weighted rule and failover across APIs; a provider's
errors, error events, streams cut or ended early."""

from __future__ import annotations

import json
import secrets

import anthropic
import openai
import pytest

from extproc.demo.fake_apis import TOOL_INPUT
from extproc.demo.fake_provider import FakeProvider
from support.anthropic_sdk import sdk_message
from support.helpers import start_gateway, wait_until

COMPAT, AZURE, CLAUDE = "api.compat.test", "example.openai.azure.com", "api.anthropic.com"
GEMINI, BEDROCK = "generativelanguage.googleapis.com", "bedrock-runtime.us-east-1.amazonaws.com"
MODELS = {COMPAT: "qwen-plus", AZURE: "gpt-4o-2024-08-06", CLAUDE: "claude-sonnet-4-5", GEMINI: "gemini-2.5-flash",
          BEDROCK: "anthropic.claude-3-5-haiku-20241022-v1:0"}
NAMES = {COMPAT: "compat", AZURE: "azure", CLAUDE: "claude", GEMINI: "gemini", BEDROCK: "bedrock"}
KEYS = {"COMPAT_KEY": "sk-compat-" + secrets.token_hex(6), "AZURE_KEY": secrets.token_hex(16),
        "ANTHROPIC_KEY": "sk-ant-" + secrets.token_hex(6), "GEMINI_KEY": "AIza" + secrets.token_hex(8),
        "AWS_KEY_ID": "AKIA" + secrets.token_hex(8).upper(), "AWS_SECRET": secrets.token_hex(20)}
HELLO = "Please introduce yourself."
CONFIG = f"""
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: compat}}
spec:
  host: {COMPAT}
  outlierDetection: {{consecutiveErrors: 1000}}  # failed again and again here: never cooled down
  configs: {{defaultConfig: {{openAIConfig: {{model: qwen-plus, apiKey: "${{COMPAT_KEY}}"}}}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: azure}}
spec:
  host: {AZURE}
  configs: {{defaultConfig: {{azureOpenAIConfig: {{deployment: gpt4o-prod, apiKey: "${{AZURE_KEY}}"}}}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: claude}}
spec:
  host: {CLAUDE}
  configs: {{defaultConfig: {{anthropicConfig: {{model: claude-sonnet-4-5, apiKey: "${{ANTHROPIC_KEY}}"}}}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: gemini}}
spec:
  host: {GEMINI}
  configs: {{defaultConfig: {{geminiConfig: {{model: gemini-2.5-flash, apiKey: "${{GEMINI_KEY}}"}}}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: bedrock}}
spec:
  host: {BEDROCK}
  configs:
    defaultConfig:
      bedrockConfig: {{model: "anthropic.claude-3-5-haiku-20241022-v1:0", region: us-east-1,
                       accessKeyId: "${{AWS_KEY_ID}}", secretAccessKey: "${{AWS_SECRET}}"}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: weighted}}
spec:
  host: weighted.test
  rules:
  - backendRefs: [{{providerHost: {COMPAT}, weight: 50}}, {{providerHost: {CLAUDE}, weight: 50}}]
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: failover}}
spec:
  host: failover.test
  rules:
  - backendRefs: [{{providerHost: {COMPAT}}}]
    fallbackRefs: [{{providerHost: {CLAUDE}}}, {{providerHost: {BEDROCK}}}]
    retries: {{attempts: 2, retryOn: [5xx]}}
"""


@pytest.fixture(scope="module")
def fakes(ca):
    made = {}
    options = {COMPAT: dict(api="openai", api_key=KEYS["COMPAT_KEY"]),
               AZURE: dict(api="azure", api_key=KEYS["AZURE_KEY"], azure_deployments={"gpt4o-prod": MODELS[AZURE]}),
               CLAUDE: dict(api="anthropic", api_key=KEYS["ANTHROPIC_KEY"]),
               GEMINI: dict(api="gemini", api_key=KEYS["GEMINI_KEY"]),
               BEDROCK: dict(api="bedrock", aws_access_key_id=KEYS["AWS_KEY_ID"],
                             aws_secret_access_key=KEYS["AWS_SECRET"])}
    for host, kw in options.items():
        cert = ca.issue([host])
        made[host] = FakeProvider(NAMES[host], cert.cert_file, cert.key_file, **kw).start()
    yield made
    for fake in made.values():
        fake.stop()


def resolve(ca, fakes) -> list[str]:
    args = ["--upstream-ca", str(ca.cert_file)]
    for host, fake in fakes.items():
        args += ["--resolve", f"{host}=127.0.0.1:{fake.port}"]
    return args


@pytest.fixture(scope="module")
def gw(ca, fakes, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("translation")
    (tmp / "config.yaml").write_text(CONFIG)
    gateway = start_gateway(tmp / "config.yaml", tmp, KEYS, resolve(ca, fakes))
    yield gateway
    assert gateway.stop() == 0


@pytest.fixture
def clean(fakes):
    for fake in fakes.values():
        fake.clear()
    return fakes


def reply(host: str) -> str:
    return f"Hello! I am {MODELS[host]}, served by {NAMES[host]}."


def new_entries(gw, before: int, count: int = 1) -> list[dict]:
    """The access log's request lines after the first `before` (attempt lines left out)."""
    def found():
        lines = [e for e in gw.access_entries() if e.get("kind") != "attempt"]
        return lines[before:] if len(lines) >= before + count else None
    return wait_until(found, 10)


def logged(gw) -> int:
    """How many request lines the access log has once it has settled (Envoy writes it each second)."""
    import time

    count, since = -1, time.monotonic()
    while time.monotonic() - since < 1.5:
        now = len([e for e in gw.access_entries() if e.get("kind") != "attempt"])
        if now != count:
            count, since = now, time.monotonic()
        time.sleep(0.1)
    return count


def openai_text(body: bytes, streamed: bool) -> tuple[str, str]:
    """(text, finish reason) of an OpenAI answer, JSON or events."""
    if not streamed:
        choice = json.loads(body)["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    events = [e for e in body.decode().split("\n\n") if e]
    assert events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e[len("data: "):]) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    return text, finishes[-1]


def anthropic_text(body: bytes, streamed: bool) -> tuple[str, str]:
    if streamed:
        message, names = sdk_message(body)
        assert names[0] == "message_start" and names[-1] == "message_stop"
    else:
        message = anthropic.types.Message.model_validate(json.loads(body))
    return "".join(b.text for b in message.content if b.type == "text"), message.stop_reason


PROVIDERS = [COMPAT, AZURE, CLAUDE, GEMINI, BEDROCK]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_every_pair_streamed_and_not_with_exact_usage(gw, clean, provider):
    """An OpenAI client and an Anthropic client, each streamed and not, to a provider of each API:
    the client's own format, the provider's words, the provider's own request (its key header, no
    client key), and the usage the provider reported, exactly, in the access log."""
    for client in ("openai", "anthropic"):
        for streamed in (False, True):
            before = logged(gw)
            if client == "openai":
                body = {"messages": [{"role": "user", "content": HELLO}], "stream": streamed}
                path, headers = "/v1/chat/completions", {"authorization": "Bearer client-key"}
            else:
                body = {"model": "any", "max_tokens": 256, "messages": [{"role": "user", "content": HELLO}],
                        "stream": streamed}
                path, headers = "/v1/messages", {"x-api-key": "client-key", "anthropic-version": "2023-06-01"}
            response = gw.request(provider, body, path=path, headers=headers, proxy_form=False)
            label = f"{client} client, streamed={streamed}, to {provider}"
            assert response.status == 200, (label, response.body[:300])
            assert response.headers["content-type"].startswith("text/event-stream" if streamed else "application/json")
            read = openai_text if client == "openai" else anthropic_text
            text, finish = read(response.body, streamed)
            assert text.strip() == reply(provider), label
            assert finish in ("stop", "end_turn"), label
            sent = clean[provider].requests[-1]
            assert "client-key" not in json.dumps(sent.headers), label
            (entry,) = new_entries(gw, before)
            assert (entry["prompt_tokens"], entry["completion_tokens"], entry["total_tokens"]) == (3, 7, 10), \
                (label, entry)
            assert entry["response_model"] == MODELS[provider] and entry["status"] == 200
            assert entry["operation"] == "chat" and entry["stream_error"] is None


def test_the_official_anthropic_sdk(gw, clean):
    """`anthropic.Anthropic` against the gateway as against Anthropic: to an Anthropic provider
    (passed on, model and key set) and to others (translated); streamed; tools; errors as its own
    exception types."""
    for provider in (CLAUDE, GEMINI, COMPAT, BEDROCK):
        client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw.listen_port}", api_key="unused",
                                     default_headers={"Host": provider}, max_retries=0, timeout=30)
        message = client.messages.create(model="claude-opus-4-1", max_tokens=100, system="Be brief.",
                                         messages=[{"role": "user", "content": HELLO}])
        assert message.content[0].text == reply(provider) and message.model == MODELS[provider]
        assert (message.usage.input_tokens + (message.usage.cache_read_input_tokens or 0),
                message.usage.output_tokens) == (5, 7)
        with client.messages.stream(model="x", max_tokens=100, messages=[{"role": "user", "content": HELLO}]) as stream:
            assert "".join(stream.text_stream).strip() == reply(provider)
            final = stream.get_final_message()
        assert final.stop_reason == "end_turn" and final.usage.output_tokens == 7
        assert final.usage.input_tokens + (final.usage.cache_read_input_tokens or 0) == 3
        weather = {"name": "get_weather", "description": "The weather in a city",
                   "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}
        called = client.messages.create(model="x", max_tokens=100, tools=[weather],
                                        messages=[{"role": "user", "content": "Weather in Paris?"}],
                                        extra_headers={"x-fake-tool": "1"})
        (use,) = [b for b in called.content if b.type == "tool_use"]
        assert (use.name, use.input, called.stop_reason) == ("get_weather", TOOL_INPUT, "tool_use")
        # the tool's result, back in the next turn
        again = client.messages.create(model="x", max_tokens=100, tools=[weather], messages=[
            {"role": "user", "content": "Weather in Paris?"}, {"role": "assistant", "content": called.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "Sunny"}]}])
        assert again.content[0].text == reply(provider)
        with pytest.raises(anthropic.RateLimitError) as limited:
            client.messages.create(model="x", max_tokens=10, messages=[{"role": "user", "content": "Hi"}],
                                   extra_headers={"x-fake-status": "429"})
        assert limited.value.body["type"] == "error" and limited.value.body["error"]["type"] == "rate_limit_error"
    with pytest.raises(anthropic.BadRequestError) as refused:  # the gateway's own check, in Anthropic's shape
        client.messages.create(model="x", max_tokens=10, messages=[{"role": "system", "content": "Hi"}])
    assert "role" in refused.value.body["error"]["message"]
    sent = clean[CLAUDE].requests[0]
    assert sent.headers["x-api-key"] == KEYS["ANTHROPIC_KEY"] and sent.body["model"] == "claude-sonnet-4-5"
    assert sent.body["system"] == "Be brief." and sent.body["max_tokens"] == 100  # unchanged but the model


@pytest.mark.parametrize("provider", [CLAUDE, GEMINI, BEDROCK])
def test_the_openai_sdk_with_tools_and_images(gw, clean, provider):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="unused",
                           default_headers={"Host": provider}, max_retries=0, timeout=30)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}}}}]
    png = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
    image = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{png}"}}
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Weather here?"}, image]}]
    answer = client.chat.completions.create(model="x", messages=messages, tools=tools, temperature=0.5, max_tokens=64,
                                            stop=["END"], extra_headers={"x-fake-tool": "1"})
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == TOOL_INPUT
    assert answer.choices[0].finish_reason == "tool_calls"
    chunks = list(client.chat.completions.create(model="x", messages=messages, tools=tools, stream=True,
                                                 stream_options={"include_usage": True},
                                                 extra_headers={"x-fake-tool": "1"}))
    pieces = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or ())]
    assert pieces[0].function.name == "get_weather"
    assert json.loads("".join(p.function.arguments or "" for p in pieces)) == TOOL_INPUT
    assert chunks[-1].usage.completion_tokens == 7 and chunks[-1].choices == []
    # the image and the settings reached the provider in its own API's shape
    sent = clean[provider].requests[0].body
    if provider == CLAUDE:
        image = sent["messages"][0]["content"][1]
        assert image == {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png}}
        assert (sent["temperature"], sent["max_tokens"], sent["stop_sequences"]) == (0.5, 64, ["END"])
    elif provider == GEMINI:
        assert sent["contents"][0]["parts"][1] == {"inlineData": {"mimeType": "image/png", "data": png}}
        assert sent["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 64, "stopSequences": ["END"]}
    else:
        assert sent["messages"][0]["content"][1] == {"image": {"format": "png", "source": {"bytes": png}}}
        assert sent["inferenceConfig"] == {"maxTokens": 64, "temperature": 0.5, "stopSequences": ["END"]}
    # a multi-turn conversation with the tool's result
    follow = client.chat.completions.create(model="x", tools=tools, messages=[
        *messages, answer.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"}])
    assert follow.choices[0].message.content == reply(provider)


def test_a_weighted_rule_over_an_openai_compatible_and_an_anthropic_provider(gw, clean):
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="unused",
                           default_headers={"Host": "weighted.test"}, max_retries=0, timeout=30)
    served = set()
    before = logged(gw)
    for i in range(24):
        if i % 2:
            chunks = list(client.chat.completions.create(model="x", messages=[{"role": "user", "content": HELLO}],
                                                         stream=True))
            model = chunks[0].model
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        else:
            answer = client.chat.completions.create(model="x", messages=[{"role": "user", "content": HELLO}])
            model, text = answer.model, answer.choices[0].message.content
        host = COMPAT if model == MODELS[COMPAT] else CLAUDE
        assert text.strip() == reply(host)
        served.add(host)
    assert served == {COMPAT, CLAUDE}  # each half the time: 2**-23 to miss one
    entries = new_entries(gw, before, 24)
    assert all((e["prompt_tokens"], e["completion_tokens"]) == (3, 7) for e in entries)
    assert {e["provider"] for e in entries} == {"default/compat", "default/claude"}


def test_failover_across_apis_before_the_first_byte(gw, clean):
    """The OpenAI-compatible primary fails: the Anthropic fallback answers, each client in its own
    format; both fail: Bedrock, signed for its own attempt. Usage is the answering provider's."""
    cases = [("openai", False), ("openai", True), ("anthropic", False), ("anthropic", True)]
    for client, streamed in cases:
        for fail, answering in (("compat:503", CLAUDE), ("compat:503,claude:503", BEDROCK)):
            before = logged(gw)
            if client == "openai":
                body = {"messages": [{"role": "user", "content": HELLO}], "stream": streamed}
                path = "/v1/chat/completions"
            else:
                body = {"model": "m", "max_tokens": 50, "messages": [{"role": "user", "content": HELLO}],
                        "stream": streamed}
                path = "/v1/messages"
            response = gw.request("failover.test", body, path=path, headers={"x-fake-fail": fail}, proxy_form=False)
            assert response.status == 200, response.body[:300]
            text, _ = (openai_text if client == "openai" else anthropic_text)(response.body, streamed)
            assert text.strip() == reply(answering), (client, streamed, fail)
            (entry,) = new_entries(gw, before)
            assert entry["provider"] == f"default/{NAMES[answering]}", entry
            assert entry["tried"] == ",".join((COMPAT, CLAUDE, BEDROCK)[:entry["attempts"] - 1]), entry
            assert (entry["prompt_tokens"], entry["completion_tokens"]) == (3, 7)
    metrics = gw.metrics()
    assert any(name == "llm_gateway_failovers_total" and ("provider", COMPAT) in labels and value >= 1
               for (name, labels), value in metrics.items())


def test_cached_tokens_and_the_metrics(gw, clean):
    before = logged(gw)
    for provider in (CLAUDE, GEMINI, BEDROCK):
        response = gw.request(provider, {"messages": [{"role": "user", "content": "one two three four"}]},
                              path="/v1/chat/completions", headers={"x-fake-cached-tokens": "3"}, proxy_form=False)
        assert json.loads(response.body)["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}
    entries = new_entries(gw, before, 3)
    assert [(e["prompt_tokens"], e["cached_tokens"]) for e in entries] == [(4, 3)] * 3

    def counted(model: str) -> float:
        return sum(v for (name, labels), v in gw.metrics().items() if name == "gen_ai_client_token_usage_sum"
                   and ("gen_ai_response_model", model) in labels)
    # every request of this module to Gemini counted exactly, whatever its client API and format
    gemini_entries = [e for e in gw.access_entries() if e.get("provider") == "default/gemini" and e["status"] == 200]
    expected = sum(e["total_tokens"] or 0 for e in gemini_entries)
    assert expected > 0 and wait_until(lambda: counted(MODELS[GEMINI]) == expected or None, 10)


def test_a_providers_errors_in_the_clients_api(gw, clean):
    openai_client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="unused",
                                  max_retries=0, timeout=30)
    for provider, status, exception in ((CLAUDE, 429, openai.RateLimitError), (GEMINI, 400, openai.BadRequestError),
                                        (BEDROCK, 500, openai.InternalServerError),
                                        (CLAUDE, 529, openai.InternalServerError)):
        with pytest.raises(exception) as failed:
            openai_client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                  extra_headers={"Host": provider, "x-fake-status": str(status)})
        assert failed.value.status_code == (503 if status == 529 else status)
        assert "answered" in failed.value.body["message"] or failed.value.body["message"] == "Overloaded" \
            or "fake provider" in json.dumps(failed.value.body)


def test_a_translated_stream_that_fails_ends_with_a_clear_error(gw, clean):
    """An error event mid-stream, a stream that ends before its last event: the client's SDK raises;
    the access log says why. A connection the provider cuts: never a complete-looking stream."""
    openai_client = openai.OpenAI(base_url=f"http://127.0.0.1:{gw.listen_port}/v1", api_key="unused",
                                  max_retries=0, timeout=30)
    anthropic_client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{gw.listen_port}", api_key="unused",
                                           max_retries=0, timeout=30)
    for provider, header, error in ((CLAUDE, "x-fake-stream-error", "overloaded_error"),
                                    (GEMINI, "x-fake-stream-error", "INTERNAL"),
                                    (BEDROCK, "x-fake-stream-error", "modelStreamErrorException"),
                                    (CLAUDE, "x-fake-end-early", "stream_incomplete"),
                                    (BEDROCK, "x-fake-end-early", "stream_incomplete")):
        before = logged(gw)
        with pytest.raises(openai.APIError):
            list(openai_client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}],
                                                       stream=True, extra_headers={"Host": provider, header: "1"}))
        if provider != CLAUDE:
            with pytest.raises(anthropic.APIStatusError):
                with anthropic_client.messages.stream(model="x", max_tokens=10,
                                                      messages=[{"role": "user", "content": "Hi"}],
                                                      extra_headers={"Host": provider, header: "1"}) as stream:
                    list(stream.text_stream)
        entries = new_entries(gw, before, 1 if provider == CLAUDE else 2)
        assert all(e["stream_error"] == error for e in entries), (provider, header, [
            (e["provider"], e["status"], e["stream_error"], e["flags"], e["details"]) for e in entries])
    # the provider drops the connection mid-stream: an error status, or the connection ends unfinished
    response = None
    try:
        response = gw.request(CLAUDE, {"messages": [{"role": "user", "content": HELLO}], "stream": True},
                              path="/v1/chat/completions", headers={"x-fake-fail": "claude:cut=4"}, proxy_form=False)
    except Exception:  # the chunked answer ends without its last chunk: http.client raises
        pass
    if response is not None:
        assert response.status == 502 and json.loads(response.body)["error"]["code"] == "bad_upstream_response"
    entry = wait_until(lambda: [e for e in gw.access_entries() if e.get("kind") != "attempt"
                                and e.get("flags") == "UPE"], 10)[-1]
    assert entry["provider"] == "default/claude"


def test_budgets_charge_translated_answers_exactly(ca, fakes, tmp_path, clean):
    """A token budget on a route to Gemini: each answer's exact usage is charged (3 + 7 tokens), so
    the third request of a 25-token budget is refused, in the client's API's shape."""
    budget = """
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: gemini-budget}
spec:
  host: generativelanguage.googleapis.com
  rules:
  - name: all
    tokens: 25
    per: 1h
"""
    (tmp_path / "config.yaml").write_text(CONFIG + budget)
    gateway = start_gateway(tmp_path / "config.yaml", tmp_path, KEYS, resolve(ca, fakes))
    try:
        requests = (({"messages": [{"role": "user", "content": HELLO}], "stream": True}, "/v1/chat/completions"),
                    ({"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": HELLO}]}, "/v1/messages"))
        for count, (body, path) in enumerate(requests, start=1):
            assert gateway.request(GEMINI, body, path=path, proxy_form=False).status == 200
            wait_until(lambda g=gateway, n=count: len(g.access_entries()) >= n, 10)
        refused = wait_until(lambda: (r := gateway.request(
            GEMINI, {"model": "m", "max_tokens": 9, "messages": [{"role": "user", "content": HELLO}]},
            path="/v1/messages", proxy_form=False)).status == 429 and r, 10)
        assert json.loads(refused.body)["type"] == "error"
        assert json.loads(refused.body)["error"]["type"] == "rate_limit_error"
        entries = [e for e in gateway.access_entries() if e["status"] == 200]
        assert [e["budget_remaining_tokens"] for e in entries][:1] == ["25"]  # admitted with all of it left
    finally:
        assert gateway.stop() == 0


def test_a_wrong_bedrock_secret_is_the_providers_403_in_the_clients_api(ca, fakes, tmp_path, clean):
    (tmp_path / "config.yaml").write_text(CONFIG)
    gateway = start_gateway(tmp_path / "config.yaml", tmp_path, {**KEYS, "AWS_SECRET": "not-the-secret"},
                            resolve(ca, fakes))
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{gateway.listen_port}/v1", api_key="unused",
                               default_headers={"Host": BEDROCK}, max_retries=0, timeout=30)
        with pytest.raises(openai.PermissionDeniedError) as refused:
            client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Hi"}])
        assert refused.value.body["code"] == "InvalidSignatureException"
        assert "not-the-secret" not in gateway.log() and "not-the-secret" not in json.dumps(gateway.access_entries())
    finally:
        assert gateway.stop() == 0


def test_no_credential_anywhere_the_gateway_writes(gw):
    """After every test above: no key, no AWS secret in the gateway's log, the access log, the
    metrics or Envoy's config dump."""
    import urllib.request

    written = [gw.log(), gw.access_log.read_text(), gw.admin("/config_dump?include_eds"),
               urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/metrics", timeout=5).read().decode()]
    for name, secret in KEYS.items():
        if name == "AWS_KEY_ID":  # not a secret: it names the key in every signature AWS receives
            continue
        assert not any(secret in text for text in written), name
