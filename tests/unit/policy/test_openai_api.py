"""The OpenAI surface: endpoint recognition, required fields, models and upstream paths (table
tests of `extproc.endpoints`), and the ext_proc's answers for each endpoint."""

from __future__ import annotations

import json

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.policy import openai_api as endpoints
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MODELS
from extproc.errors import GatewayError
from extproc.protocol import METADATA_NAMESPACE
from extproc.dataplane.body_rewrite import rewrite_body
from extproc.policy.table import DEFAULT_BASES, Target
from support.ext_proc_messages import body_msg, error_of, headers_msg, processor, run, set_headers
from support.manifests import DASHSCOPE, MOONSHOT, load_docs, load_seed, provider, route, rule

DASH_BASES = DEFAULT_BASES | {"/compatible-mode/v1"}


def target(model="chat-m", stream=None, base_path="/base/v1", embedding_model=None) -> Target:
    return Target(route="default/r", rule="rules[0]", provider="default/p", provider_host="p.example.com",
                  cluster="c", path="/base/v1/chat/completions", model=model, stream=stream,
                  base_path=base_path, embedding_model=embedding_model)


@pytest.mark.parametrize(("method", "path", "expected"), [
    ("POST", "/", CHAT),
    ("POST", "", CHAT),
    ("POST", "/v1", CHAT),
    ("POST", "/v1/chat/completions", CHAT),
    ("POST", "/chat/completions", CHAT),
    ("POST", "/compatible-mode/v1/chat/completions", CHAT),
    ("POST", "/v1/chat/completions?api-version=1", CHAT),
    ("POST", "/v1/chat/completions/", CHAT),
    ("POST", "/v1/embeddings", EMBEDDINGS),
    ("POST", "/embeddings", EMBEDDINGS),
    ("POST", "/compatible-mode/v1/embeddings", EMBEDDINGS),
    ("POST", "/v1/completions", COMPLETIONS),
    ("POST", "/compatible-mode/v1/completions", COMPLETIONS),
    ("GET", "/v1/models", MODELS),
    ("GET", "/models", MODELS),
    ("GET", "/compatible-mode/v1/models?limit=5", MODELS),
])
def test_recognize(method, path, expected):
    assert endpoints.recognize(method, path, DASH_BASES) is expected


@pytest.mark.parametrize(("method", "path", "status", "code"), [
    ("POST", "/v2/chat/completions", 404, "unknown_endpoint"),
    ("POST", "/other-mode/v1/embeddings", 404, "unknown_endpoint"),  # not a base of this route
    ("POST", "/v1/images/generations", 404, "unknown_endpoint"),
    ("POST", "/v1/models/extra", 404, "unknown_endpoint"),
    ("POST", "/v1/models", 405, "method_not_allowed"),
    ("GET", "/v1/chat/completions", 405, "method_not_allowed"),
    ("GET", "/", 405, "method_not_allowed"),
    ("PUT", "/v1/embeddings", 405, "method_not_allowed"),
    ("DELETE", "/v1/models", 405, "method_not_allowed"),
])
def test_recognize_refuses_naming_what_is_supported(method, path, status, code):
    with pytest.raises(GatewayError) as err:
        endpoints.recognize(method, path, DASH_BASES)
    assert (err.value.status, err.value.code) == (status, code)
    assert "POST .../embeddings" in err.value.message and "GET .../models" in err.value.message


@pytest.mark.parametrize(("path", "declared", "expected"), [
    ("/compatible-mode/v1/chat/completions", None, "/compatible-mode/v1"),
    ("/v1/chat/completions", None, "/v1"),
    ("/chat/completions", None, ""),
    ("/api/chat", None, None),
    ("/api/chat", "/api/v1", "/api/v1"),
    ("/api/chat", "/api/v1/", "/api/v1"),
    ("/v1/chat/completions", "/", ""),
])
def test_base_path(path, declared, expected):
    assert endpoints.base_path(path, declared) == expected


@pytest.mark.parametrize(("endpoint", "tgt", "expected"), [
    (CHAT, target(), "/base/v1/chat/completions"),
    (CHAT, target(base_path=None), "/base/v1/chat/completions"),
    (EMBEDDINGS, target(), "/base/v1/embeddings"),
    (COMPLETIONS, target(), "/base/v1/completions"),
    (EMBEDDINGS, target(base_path=""), "/embeddings"),
])
def test_upstream_path(endpoint, tgt, expected):
    assert endpoints.upstream_path(endpoint, tgt) == expected


def test_upstream_path_without_base_is_a_404_naming_the_provider_and_field():
    with pytest.raises(GatewayError) as err:
        endpoints.upstream_path(EMBEDDINGS, target(base_path=None))
    assert (err.value.status, err.value.code) == (404, "unsupported_endpoint")
    assert "default/p" in err.value.message and "spec.basePath" in err.value.message


@pytest.mark.parametrize(("endpoint", "body", "tgt", "expected"), [
    # embeddings: the configured embedding model, else the client's; never the chat model
    (EMBEDDINGS, {"input": "hi", "model": "client-e"}, target(), {"input": "hi", "model": "client-e"}),
    (EMBEDDINGS, {"input": ["a", "b"], "model": "client-e"}, target(embedding_model="conf-e"),
     {"input": ["a", "b"], "model": "conf-e"}),
    (EMBEDDINGS, {"input": [[1, 2]]}, target(embedding_model="conf-e"), {"input": [[1, 2]], "model": "conf-e"}),
    (EMBEDDINGS, {"input": "hi", "model": "e", "dimensions": 8, "encoding_format": "base64"}, target(stream=True),
     {"input": "hi", "model": "e", "dimensions": 8, "encoding_format": "base64"}),  # config stream is chat's
    # completions: the client's model; stream as the client asked, with usage asked for
    (COMPLETIONS, {"prompt": "Say hi", "model": "client-c"}, target(stream=False), {"prompt": "Say hi", "model": "client-c"}),
    (COMPLETIONS, {"prompt": ["a"], "model": "c", "stream": True}, target(stream=False),
     {"prompt": ["a"], "model": "c", "stream": True, "stream_options": {"include_usage": True}}),
    # chat: unchanged, the configured model and stream
    (CHAT, {"messages": [{"role": "user", "content": "x"}], "model": "client"}, target(stream=True),
     {"messages": [{"role": "user", "content": "x"}], "model": "chat-m", "stream": True,
      "stream_options": {"include_usage": True}}),
])
def test_rewrite_per_endpoint(endpoint, body, tgt, expected):
    out = rewrite_body(json.dumps(body).encode(), tgt, endpoint)
    assert json.loads(out.body) == expected
    assert out.model == expected["model"]
    assert out.stream == (expected.get("stream") is True)


@pytest.mark.parametrize(("endpoint", "body", "tgt", "code"), [
    (EMBEDDINGS, {"model": "e"}, target(), "invalid_input"),
    (EMBEDDINGS, {"model": "e", "input": ""}, target(), "invalid_input"),
    (EMBEDDINGS, {"model": "e", "input": []}, target(), "invalid_input"),
    (EMBEDDINGS, {"model": "e", "input": 5}, target(), "invalid_input"),
    (EMBEDDINGS, {"model": "e", "messages": [{"role": "user", "content": "x"}]}, target(), "invalid_input"),
    (EMBEDDINGS, {"input": "hi"}, target(), "missing_model"),  # no embeddingModel, none from the client
    (COMPLETIONS, {"model": "c"}, target(), "invalid_prompt"),
    (COMPLETIONS, {"model": "c", "prompt": 3}, target(), "invalid_prompt"),
    (COMPLETIONS, {"prompt": "hi"}, target(), "missing_model"),
    (COMPLETIONS, {"model": "c", "prompt": "hi", "stream": "yes"}, target(), "invalid_stream"),
    (CHAT, {"input": "hi"}, target(), "invalid_messages"),
])
def test_rewrite_refuses_a_body_without_the_endpoints_field(endpoint, body, tgt, code):
    with pytest.raises(GatewayError) as err:
        rewrite_body(json.dumps(body).encode(), tgt, endpoint)
    assert (err.value.status, err.value.code) == (400, code)


# --- through the ext_proc ---------------------------------------------------------------------

def exchange(table, authority, path, body, method="POST", draw=0.0):
    msgs = [headers_msg(authority, method=method, extra={":path": path}, end_of_stream=body is None)]
    if body is not None:
        msgs.append(body_msg(body))
    return run(processor(table, draw), *msgs)


@pytest.fixture(scope="module")
def seed_table():
    return load_seed("01-LLMProvider.yaml", "02-LLMRoute.yaml", "03-LLMProvider-with-route-config.yaml",
                     "04-LLMProvider-moonshot.yaml", "05-demo-llm-server.yaml", "06-LLMRoute-weighted.yaml").table


@pytest.mark.parametrize(("path", "draw", "upstream", "host"), [
    ("/compatible-mode/v1/embeddings", 0.0, "/compatible-mode/v1/embeddings", DASHSCOPE),
    ("/v1/embeddings", 0.0, "/compatible-mode/v1/embeddings", DASHSCOPE),
    ("/embeddings", 0.99, "/v1/embeddings", MOONSHOT),
    # the client's base may be another provider's of the same route: the chosen one's is sent
    ("/compatible-mode/v1/embeddings", 0.99, "/v1/embeddings", MOONSHOT),
])
def test_embeddings_routed_like_chat(seed_table, path, draw, upstream, host):
    headers, body = exchange(seed_table, "demo-llm-server", path, {"input": "hello", "model": "text-embedding-v3"},
                             draw=draw)
    sent = set_headers(headers)
    assert (sent[":path"], sent[":authority"]) == (upstream, host)
    assert sent["authorization"].startswith("Bearer sk-unit-")
    assert json.loads(body.request_body.response.body_mutation.body) == {"input": "hello", "model": "text-embedding-v3"}
    meta = headers.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert meta["operation"].string_value == "embeddings"
    assert meta["request_model"].string_value == "text-embedding-v3"


def test_completions_metadata_and_path(seed_table):
    headers, _ = exchange(seed_table, DASHSCOPE, "/v1/completions", {"prompt": "hi", "model": "qwen-c"})
    assert set_headers(headers)[":path"] == "/compatible-mode/v1/completions"
    meta = headers.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert (meta["operation"].string_value, meta["request_model"].string_value) == ("text_completion", "qwen-c")


def test_embedding_model_from_the_config_and_route_specific_config(tmp_path):
    table = load_docs(tmp_path,
                      provider("p", "p.example.com", model="chat-1", route_configs={
                          "team": {"embeddingModel": "embed-team"}}, basePath="/api/v2", path="/api/chat"),
                      route("r", "svc", [rule("p.example.com", name="team",
                                              matches=[{"headers": {"x-team": {}}}]), rule("p.example.com")])).table
    (headers, body) = exchange_with(table, "svc", "/v1/embeddings", {"input": "x", "model": "client"}, {"x-team": "a"})
    assert set_headers(headers)[":path"] == "/api/v2/embeddings"
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "embed-team"
    (headers, body) = exchange_with(table, "svc", "/v1/embeddings", {"input": "x", "model": "client"}, {})
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "client"
    # chat still goes to spec.path with the chat model
    (headers, body) = exchange_with(table, "svc", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, {})
    assert set_headers(headers)[":path"] == "/api/chat"
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "chat-1"


def exchange_with(table, authority, path, body, extra):
    msgs = [headers_msg(authority, extra={":path": path, **extra}), body_msg(body)]
    return run(processor(table), *msgs)


def test_provider_without_base_path_answers_chat_only(tmp_path):
    table = load_docs(tmp_path, provider("p", "p.example.com", path="/api/chat")).table
    headers, _ = exchange(table, "p.example.com", "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert set_headers(headers)[":path"] == "/api/chat"
    (response,) = exchange(table, "p.example.com", "/v1/embeddings", {"input": "x", "model": "e"})
    status, err, _, _ = error_of(response)
    assert (status, err["error"]["code"]) == (404, "unsupported_endpoint")
    assert "spec.basePath" in err["error"]["message"]


@pytest.mark.parametrize(("host", "path", "expected"), [
    ("demo-llm-server", "/v1/models", [("qwen1.5-72b-chat", DASHSCOPE), ("moonshot-v1-8k", MOONSHOT)]),
    ("demo-llm-server", "/compatible-mode/v1/models", [("qwen1.5-72b-chat", DASHSCOPE), ("moonshot-v1-8k", MOONSHOT)]),
    # the seed's scenario 1: subscribers are sent qwen-turbo, everyone else the default model
    (DASHSCOPE, "/models", [("qwen-turbo", DASHSCOPE), ("qwen1.5-72b-chat", DASHSCOPE)]),
    (MOONSHOT, "/v1/models", [("moonshot-v1-8k", MOONSHOT)]),
])
def test_models_answered_by_the_gateway_from_the_config(seed_table, host, path, expected):
    (response,) = exchange(seed_table, host, path, None, method="GET")
    imm = response.immediate_response
    assert imm.status.code == 200 and imm.details == "llm_gateway_models"
    assert {o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}["content-type"] == "application/json"
    listing = json.loads(imm.body)
    assert listing["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in listing["data"]] == expected
    assert all(m["object"] == "model" for m in listing["data"])
    assert b"sk-unit" not in imm.body
    meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert meta["operation"].string_value == "models"


def test_models_lists_embedding_models_once(tmp_path):
    table = load_docs(tmp_path, provider("a", "a.example.com", model="m1", route_configs={"x": {"embeddingModel": "e1"}}),
                      provider("b", "b.example.com", model="m1"),
                      route("r", "svc", [rule("a.example.com", name="x"), rule("b.example.com")])).table
    (response,) = exchange(table, "svc", "/v1/models", None, method="GET")
    assert [m["id"] for m in json.loads(response.immediate_response.body)["data"]] == ["m1", "e1"]


@pytest.mark.parametrize(("host", "method", "path", "status", "code"), [
    ("unknown.example.com", "GET", "/v1/models", 404, "unknown_host"),
    (DASHSCOPE, "POST", "/v1/images/generations", 404, "unknown_endpoint"),
    (DASHSCOPE, "POST", "/v1/models", 405, "method_not_allowed"),
    (DASHSCOPE, "GET", "/v1/embeddings", 405, "method_not_allowed"),
])
def test_other_paths_and_methods(seed_table, host, method, path, status, code):
    responses = exchange(seed_table, host, path, {"input": "x"} if method == "POST" else None, method=method)
    got, err, _, _ = error_of(responses[-1])
    assert (got, err["error"]["code"]) == (status, code)


# --- usage of every endpoint, counted under its operation ----------------------------------------

def _entry(meta: dict, status: int = 200, details: str = "via_upstream"):
    from envoy.data.accesslog.v3 import accesslog_pb2

    e = accesslog_pb2.HTTPAccessLogEntry()
    e.response.response_code.value = status
    e.response.response_code_details = details
    e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].update(meta)
    return e


@pytest.mark.parametrize(("meta", "status", "details", "operation", "outcome", "tokens"), [
    ({"operation": "embeddings", "prompt_tokens": 7, "total_tokens": 7}, 200, "via_upstream", "embeddings", "success",
     {"input": 7.0}),
    ({"operation": "text_completion", "prompt_tokens": 3, "completion_tokens": 5}, 200, "via_upstream",
     "text_completion", "success", {"input": 3.0, "output": 5.0}),
    ({"prompt_tokens": 3, "completion_tokens": 5}, 200, "via_upstream", "chat", "success", {"input": 3.0, "output": 5.0}),
    ({"operation": "models"}, 200, "llm_gateway_models", "models", "success", {}),
    ({"operation": "embeddings"}, 429, "via_upstream", "embeddings", "provider_error", {}),
])
def test_operation_reaches_the_metrics(meta, status, details, operation, outcome, tokens):
    from extproc.telemetry.access_entries import record_from_entry
    from extproc.telemetry.metrics import GatewayMetrics

    record = record_from_entry(_entry({"route": "default/r", "provider_host": "h", **meta}, status, details))
    assert (record.operation, record.outcome) == (operation, outcome)
    metrics = GatewayMetrics()
    metrics.observe(record)
    samples = {(s.name, s.labels.get("gen_ai_token_type")): (s.value, s.labels)
               for family in metrics.registry.collect() for s in family.samples}
    value, labels = samples[("llm_gateway_requests_total", None)]
    assert value == 1 and labels["gen_ai_operation_name"] == operation and labels["outcome"] == outcome
    for kind, count in tokens.items():
        value, labels = samples[("gen_ai_client_token_usage_sum", kind)]
        assert value == count and labels["gen_ai_operation_name"] == operation


def test_a_refused_body_is_counted_under_its_endpoint(seed_table):
    (response,) = exchange(seed_table, DASHSCOPE, "/v1/embeddings", {"model": "e", "input": []})
    assert error_of(response)[1]["error"]["code"] == "invalid_input"
    meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert meta["operation"].string_value == "embeddings"
