"""The texts of a request, whatever its client's API: one reader of prompts for every API."""

from __future__ import annotations

import pytest

from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, MODELS
from extproc.policy.request_texts import texts_of_request


@pytest.mark.parametrize(("endpoint", "body", "texts"), [
    (CHAT, {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                      {"type": "image_url", "image_url": {"url": "data:x"}}]},
                         {"role": "assistant", "content": None, "tool_calls": [
                             {"id": "c", "type": "function", "function": {"name": "f", "arguments": '{"q": "card"}'}}]},
                         {"role": "tool", "tool_call_id": "c", "content": "4111 1111"}]},
     ["Be brief.", "What is this?", '{"q": "card"}', "4111 1111"]),
    (MESSAGES, {"system": [{"type": "text", "text": "Be brief."}], "messages": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f", "input": {"q": "ü"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t",
                                      "content": [{"type": "text", "text": "result"}]},
                                     {"type": "image", "source": {"type": "base64", "data": "AAAA"}}]}]},
     ["Be brief.", "Hi", '{"q": "ü"}', "result"]),
    (COMPLETIONS, {"prompt": ["one", [1, 2], "two"]}, ["one", "two"]),
    (EMBEDDINGS, {"input": "a text"}, ["a text"]),
    (MODELS, {}, []),
    (CHAT, {"messages": "not a list"}, []),
])
def test_texts_of_every_client_api(endpoint, body, texts):
    assert texts_of_request(endpoint, body) == texts
