"""The ext_proc's answers for requests of translated pairs of APIs, message by message as Envoy sends
them: the provider's own key header (and every other credential header removed), its path (per
request for Gemini and Bedrock, with Bedrock's signature), the translated body, the request
marked so that its answer comes back; errors in the client's API's shape; a rule whose providers
speak several APIs: the client's own body for every attempt, translated by the retry rewrite,
the first attempt included, each signed for its own provider."""

from __future__ import annotations

import json

import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.dataplane.retry_processor import RetryExchange
from extproc.protocol import ANSWER_HEADER, TRANSLATE_HEADER
from support.ext_proc_messages import body_msg, error_of, forward, headers_msg, processor, run, set_headers

ENV = {"K_OPENAI": "sk-o", "K_CLAUDE": "sk-ant", "K_GEMINI": "g-key", "AWS_ID": "AKIAX", "AWS_SECRET": "s3"}


def provider(name: str, host: str, config: dict) -> dict:
    return {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMProvider", "metadata": {"name": name},
            "spec": {"host": host, "configs": {"defaultConfig": config}}}


DOCS = [
    provider("compat", "compat.test", {"openAIConfig": {"model": "qwen-plus", "apiKey": "${K_OPENAI}"}}),
    provider("claude", "claude.test", {"anthropicConfig": {"model": "claude-sonnet-4-5", "apiKey": "${K_CLAUDE}"}}),
    provider("gemini", "gemini.test", {"geminiConfig": {"model": "gemini-2.5-flash", "apiKey": "${K_GEMINI}"}}),
    provider("bedrock", "bedrock.test", {"bedrockConfig": {
        "model": "amazon.nova-lite-v1:0", "region": "us-east-1", "accessKeyId": "${AWS_ID}",
        "secretAccessKey": "${AWS_SECRET}"}}),
    {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute", "metadata": {"name": "mixed"},
     "spec": {"host": "mixed.test", "rules": [{"name": "main", "backendRefs": [{"providerHost": "compat.test"}],
                                               "fallbackRefs": [{"providerHost": "claude.test"},
                                                                {"providerHost": "bedrock.test"}],
                                               "retries": {"attempts": 2}}]}},
]


def table():
    objs, problems = load_text(yaml.safe_dump_all(DOCS), "f.yaml", ENV)
    compiled = compile_config(objs)
    assert not [p for p in problems + compiled.problems if p.severity == "error"]
    return compiled.table


CHAT = {"model": "x", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        "max_tokens": 10}
CLIENT_HEADERS = {"authorization": "Bearer client-key", "x-api-key": "client-key", "x-goog-api-key": "c"}


def removed(response) -> list[str]:
    return list(response.request_headers.response.header_mutation.remove_headers)


def metadata(response) -> dict:
    from google.protobuf.json_format import MessageToDict

    return MessageToDict(response.dynamic_metadata)["llm_gateway"]


def test_an_openai_request_to_anthropic():
    sent = forward(table(), "claude.test", {**CHAT, "stream": True}, extra=CLIENT_HEADERS)
    headers = set_headers(sent.headers)
    assert headers[":path"] == "/v1/messages" and headers[":authority"] == "claude.test"
    assert headers["x-api-key"] == "sk-ant" and headers["anthropic-version"] == "2023-06-01"
    assert {"authorization", "x-goog-api-key", "api-key"} <= set(removed(sent.headers))
    assert headers[ANSWER_HEADER] == "1"  # the answer comes back, to be translated
    body = json.loads(sent.body)
    assert body == {"model": "claude-sonnet-4-5", "system": "Be brief.", "max_tokens": 10, "stream": True,
                    "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert headers["content-length"] == str(len(sent.body))
    meta = metadata(sent.headers)
    assert meta["provider_api"] == "anthropic" and meta["client_stream"] is True and meta["stream"] is True
    assert meta["request_model"] == "claude-sonnet-4-5" and "client_api" not in meta


def test_gemini_and_bedrock_paths_per_request_and_bedrocks_signature():
    sent = forward(table(), "gemini.test", {**CHAT, "stream": True})
    headers = set_headers(sent.headers)
    assert headers[":path"] == "/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse"
    assert headers["x-goog-api-key"] == "g-key" and "authorization" in removed(sent.headers)
    sent = forward(table(), "bedrock.test", CHAT, extra=CLIENT_HEADERS)
    headers = set_headers(sent.headers)
    assert headers[":path"] == "/model/amazon.nova-lite-v1%3A0/converse"
    assert headers["authorization"].startswith("AWS4-HMAC-SHA256 Credential=AKIAX/") and "x-amz-date" in headers
    assert "s3" not in headers["authorization"]
    assert json.loads(sent.body)["inferenceConfig"] == {"maxTokens": 10}


def test_an_anthropic_client_to_an_openai_provider():
    message = {"model": "claude", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    sent = forward(table(), "compat.test", message, extra={":path": "/v1/messages", **CLIENT_HEADERS,
                                                            "anthropic-version": "2023-06-01"})
    headers = set_headers(sent.headers)
    assert headers[":path"] == "/v1/chat/completions" and headers["authorization"] == "Bearer sk-o"
    assert {"x-api-key", "anthropic-version", "anthropic-beta"} <= set(removed(sent.headers))
    assert json.loads(sent.body) == {"model": "qwen-plus", "max_tokens": 20, "stream": True,
                                     "stream_options": {"include_usage": True},
                                     "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    meta = metadata(sent.headers)
    assert meta["client_api"] == "anthropic" and "provider_api" not in meta


def test_an_anthropic_client_to_anthropic_changes_only_the_model():
    message = {"model": "claude", "max_tokens": 20, "messages": [{"role": "user", "content": "Hi"}], "top_k": 3,
               "thinking": {"type": "enabled", "budget_tokens": 10}}
    sent = forward(table(), "claude.test", message, extra={":path": "/v1/messages", "anthropic-beta": "x"})
    assert json.loads(sent.body) == {**message, "model": "claude-sonnet-4-5"}
    assert "anthropic-beta" not in removed(sent.headers)  # its own API's header reaches it


def test_an_anthropic_clients_errors_are_anthropics():
    status, body, _, _ = error_of(run(processor(table()), headers_msg("claude.test", extra={":path": "/v1/messages"}),
                                      body_msg({"model": "m", "messages": [{"role": "user", "content": "x"}]}))[-1])
    assert status == 400
    assert body == {"type": "error", "error": {"type": "invalid_request_error",
                                               "message": "max_tokens: a positive integer is required"}}
    status, body, _, _ = error_of(run(processor(table()), headers_msg("claude.test", extra={":path": "/v1/messages"},
                                                                      end_of_stream=True))[-1])
    assert status == 400 and body["type"] == "error"  # decided before a body came, still the client's shape


def test_embeddings_cannot_go_to_anthropic():
    status, body, _, _ = error_of(run(processor(table()), headers_msg("claude.test", extra={":path": "/v1/embeddings"}),
                                      body_msg({"model": "m", "input": "x"}))[-1])
    assert status == 404 and body["error"]["code"] == "unsupported_endpoint"


def test_a_rule_of_several_apis_sends_the_clients_body_and_translates_each_attempt():
    sent = forward(table(), "mixed.test", CHAT)
    headers = set_headers(sent.headers)
    assert headers[TRANSLATE_HEADER] == "1" and headers["x-llm-gateway-order"].count(",") == 2
    assert json.loads(sent.body) == CHAT  # the client's own, for every attempt
    meta = metadata(sent.headers)
    assert meta["client_body"] is True
    order = headers["x-llm-gateway-order"]
    for attempt, expected_path in ((1, "/v1/chat/completions"), (2, "/v1/messages"),
                                   (3, "/model/amazon.nova-lite-v1%3A0/converse")):
        (head,), (body,) = retry(order, attempt, sent.body, meta)
        assert TRANSLATE_HEADER in head.request_headers.response.header_mutation.remove_headers
        values = {o.header.key: o.header.raw_value.decode()
                  for o in body.request_body.response.header_mutation.set_headers}
        assert values[":path"] == expected_path
        rewritten = json.loads(body.request_body.response.body_mutation.body)
        out_meta = metadata(body)
        if attempt == 1:
            assert rewritten["model"] == "qwen-plus" and out_meta["provider_api"] == "openai"
        elif attempt == 2:
            assert rewritten["system"] == "Be brief." and out_meta["provider_api"] == "anthropic"
            assert "anthropic-version" not in head.request_headers.response.header_mutation.remove_headers
        else:
            assert values["authorization"].startswith("AWS4-HMAC-SHA256") and out_meta["provider_api"] == "bedrock"
            assert rewritten["system"] == [{"text": "Be brief."}]
            assert "anthropic-version" in head.request_headers.response.header_mutation.remove_headers


def retry(order: str, attempt: int, body: bytes, meta: dict):
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key="x-llm-gateway-order", raw_value=order.encode()),
        base_pb2.HeaderValue(key="x-envoy-attempt-count", raw_value=str(attempt).encode())])))
    headers.metadata_context.filter_metadata["llm_gateway"].update(meta)
    exchange = RetryExchange(table())
    first, done = exchange.on_request(headers)
    assert not done, first
    second, done = exchange.on_request(pb.ProcessingRequest(request_body=pb.HttpBody(body=body, end_of_stream=True)))
    assert done
    return first, second


def test_a_rule_of_several_apis_sends_the_prompt_as_the_data_policy_left_it():
    """Every attempt translates the client's own body: with a data policy that masks, that body is
    the masked one (the original, sent on for the attempts to translate, would leave unmasked)."""
    policy = {"apiVersion": "llm-gateway.dev/v1alpha1", "kind": "LLMDataPolicy", "metadata": {"name": "cards"},
              "spec": {"rules": [{"name": "cards", "detectors": [{"builtin": "bank-card"}], "action": "mask"}]}}
    objs, problems = load_text(yaml.safe_dump_all([*DOCS, policy]), "f.yaml", ENV)
    compiled = compile_config(objs)
    assert not [p for p in problems + compiled.problems if p.severity == "error"]
    card = {**CHAT, "messages": [{"role": "user", "content": "my card 4111 1111 1111 1111"}]}
    sent = forward(compiled.table, "mixed.test", card)
    assert set_headers(sent.headers)[TRANSLATE_HEADER] == "1"  # each attempt translates what is sent here
    assert json.loads(sent.body)["messages"][0]["content"] == "my card [BANK-CARD]"
    assert b"4111" not in sent.body
