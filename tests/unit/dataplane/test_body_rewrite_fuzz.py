"""Property-based fuzzing of the request body rewrite: whatever body a client sends, the answer is
a rewrite or a clear 4xx, never a crash. (Settings and a long run: support/fuzz.py.)"""

from __future__ import annotations

import json

import orjson
from hypothesis import given
from hypothesis import strategies as st

from extproc.dataplane.body_rewrite import rewrite_body
from extproc.errors import GatewayError
from extproc.policy import openai_api as endpoints
from extproc.policy.table import Target
from support.fuzz import fuzz, json_values

TARGETS = [
    Target("r", "rule", "p", "h", "c", "/v1/chat/completions", "m", None, "k"),
    Target("r", "rule", "p", "h", "c", "/v1/chat/completions", None, True, "k"),
    Target("r", "rule", "p", "h", "c", "/v1/chat/completions", "m", False, None),
]


def _check_rewrite(body: bytes, target: Target) -> None:
    try:
        out = rewrite_body(body, target)
    except GatewayError as exc:
        assert 400 <= exc.status < 500 and json.loads(exc.body())["error"]["code"]
        return
    data = orjson.loads(out.body)
    assert isinstance(data, dict) and isinstance(data["messages"], list) and data["messages"]
    if target.model is not None:
        assert data["model"] == target.model
    if target.stream is not None:
        assert data["stream"] is target.stream


@fuzz
@given(st.binary(max_size=512), st.sampled_from(TARGETS))
def test_any_bytes_get_a_rewrite_or_a_4xx(body, target):
    _check_rewrite(body, target)


@fuzz
@given(json_values, st.sampled_from(TARGETS))
def test_any_json_gets_a_rewrite_or_a_4xx(value, target):
    _check_rewrite(json.dumps(value).encode(), target)


@fuzz
@given(st.dictionaries(st.sampled_from(["messages", "model", "stream", "stream_options", "temperature"]), json_values),
       st.sampled_from(TARGETS))
def test_chat_shaped_json_gets_a_rewrite_or_a_4xx(value, target):
    _check_rewrite(json.dumps(value).encode(), target)


@fuzz
@given(st.dictionaries(st.sampled_from(["input", "prompt", "model", "stream", "stream_options", "encoding_format"]),
                       json_values),
       st.sampled_from([endpoints.EMBEDDINGS, endpoints.COMPLETIONS]),
       st.sampled_from([*TARGETS, Target("r", "rule", "p", "h", "c", "/v1/chat/completions", "m", True, "k",
                                         base_path="/v1", embedding_model="e")]))
def test_embeddings_and_completions_get_a_rewrite_or_a_4xx(value, endpoint, target):
    """Other endpoints: their own field required, the model configured for them or the client's."""
    try:
        out = rewrite_body(json.dumps(value).encode(), target, endpoint)
    except GatewayError as exc:
        assert 400 <= exc.status < 500 and json.loads(exc.body())["error"]["code"]
        return
    data = orjson.loads(out.body)
    assert data[endpoint.required] == value[endpoint.required]
    expected_model = (target.embedding_model if endpoint is endpoints.EMBEDDINGS and target.embedding_model
                      else value["model"])
    assert data["model"] == out.model == expected_model
    assert data.get("stream") == value.get("stream")  # the config's stream is chat's only
    assert out.stream == (endpoint is endpoints.COMPLETIONS and value.get("stream") is True)
