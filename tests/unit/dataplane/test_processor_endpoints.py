"""The ext_proc's answers for each OpenAI endpoint: embeddings and completions routed like chat to
the chosen provider's base path, the model list answered by the gateway from the config, and
what is refused."""

from __future__ import annotations

import json

import pytest

from extproc.protocol import METADATA_NAMESPACE
from support.ext_proc_messages import body_msg, error_of, headers_msg, processor, run, set_headers
from support.manifests import DASHSCOPE, MOONSHOT, load_docs, load_seed, provider, route, rule


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
    (headers, body) = exchange_with(table, "svc", "/v1/chat/completions",
                                    {"messages": [{"role": "user", "content": "x"}]}, {})
    assert set_headers(headers)[":path"] == "/api/chat"
    assert json.loads(body.request_body.response.body_mutation.body)["model"] == "chat-1"


def exchange_with(table, authority, path, body, extra):
    msgs = [headers_msg(authority, extra={":path": path, **extra}), body_msg(body)]
    return run(processor(table), *msgs)


def test_provider_without_base_path_answers_chat_only(tmp_path):
    table = load_docs(tmp_path, provider("p", "p.example.com", path="/api/chat")).table
    headers, _ = exchange(table, "p.example.com", "/v1/chat/completions",
                          {"messages": [{"role": "user", "content": "x"}]})
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
    assert ({o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}["content-type"]
            == "application/json")
    listing = json.loads(imm.body)
    assert listing["object"] == "list"
    assert [(m["id"], m["owned_by"]) for m in listing["data"]] == expected
    assert all(m["object"] == "model" for m in listing["data"])
    assert b"sk-unit" not in imm.body
    meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert meta["operation"].string_value == "models"


def test_models_lists_embedding_models_once(tmp_path):
    table = load_docs(tmp_path,
                      provider("a", "a.example.com", model="m1", route_configs={"x": {"embeddingModel": "e1"}}),
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


def test_a_refused_body_is_counted_under_its_endpoint(seed_table):
    (response,) = exchange(seed_table, DASHSCOPE, "/v1/embeddings", {"model": "e", "input": []})
    assert error_of(response)[1]["error"]["code"] == "invalid_input"
    meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert meta["operation"].string_value == "embeddings"
    assert meta["route"].string_value == "default/dashscope-route"


@pytest.mark.parametrize("path", ["/v1/models/qwen-turbo", "/compatible-mode/v1/models/qwen-turbo", "/models/x"])
def test_retrieving_one_model_is_a_404_counted_as_models(seed_table, path):
    """Not supported (docs/api.md), and counted as what it is: not a chat request."""
    (response,) = exchange(seed_table, DASHSCOPE, path, None, method="GET")
    assert error_of(response)[1]["error"]["code"] == "unknown_endpoint"
    meta = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
    assert meta["operation"].string_value == "models"


def test_an_unknown_endpoint_names_no_operation(seed_table):
    (response,) = exchange(seed_table, DASHSCOPE, "/v1/images/generations", {"prompt": "x"})
    assert METADATA_NAMESPACE not in response.dynamic_metadata.fields
