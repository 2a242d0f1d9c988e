"""The OpenAI surface (table tests of `extproc.policy.openai_api`): endpoint recognition, upstream
paths, and each endpoint's required field and model, as the body rewrite applies them. The
ext_proc's answers for each endpoint: dataplane/test_processor_endpoints.py."""

from __future__ import annotations

import json

import pytest

from extproc.dataplane.body_rewrite import rewrite_body
from extproc.errors import GatewayError
from extproc.policy import openai_api as endpoints
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MODELS
from extproc.policy.table import DEFAULT_BASES, Target

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
    (COMPLETIONS, {"prompt": "Say hi", "model": "client-c"}, target(stream=False),
     {"prompt": "Say hi", "model": "client-c"}),
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


