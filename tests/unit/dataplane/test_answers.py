"""The ext_proc's prebuilt answers: an immediate error's headers, and the decision's metadata (cached
per target, model and stream where the model is short)."""

from __future__ import annotations

import pytest

from support.ext_proc_messages import CHAT, forward
from support.manifests import load_docs, provider


def test_an_error_answer_carries_each_of_its_own_headers_once():
    from extproc.dataplane.answers import immediate
    from extproc.policy.body_memory import Overloaded

    headers = immediate(Overloaded(9 << 20, 8 << 20)).immediate_response.headers.set_headers
    names = [h.header.key for h in headers]
    assert sorted(names) == ["content-type", "retry-after"], names


@pytest.mark.parametrize("model_size", [8, 300])  # 300: past the cached sizes, encoded per request
@pytest.mark.parametrize("stream", [False, True])
def test_the_decision_metadata_names_target_model_stream_and_host(tmp_path, model_size, stream):
    from extproc.dataplane.answers import cached_decision_metadata

    model = "m" * model_size
    table = load_docs(tmp_path, provider("local", "local.example.com", model=model)).table
    cached_decision_metadata.cache_clear()
    for authority in ("local.example.com", "LOCAL.example.com:80"):  # the host as the client sent it
        response = forward(table, authority, body={**CHAT, "model": model, "stream": stream})
        meta = response.headers.dynamic_metadata.fields["llm_gateway"].struct_value.fields
        assert {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in meta.items()} == {
            "route": "default/local", "rule": "default", "provider": "default/local",
            "provider_host": "local.example.com", "operation": "chat", "request_model": model, "stream": stream,
            "host": authority}
    assert cached_decision_metadata.cache_info().currsize == (2 if model_size < 256 else 0)
