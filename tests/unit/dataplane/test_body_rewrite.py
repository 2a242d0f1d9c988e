"""The request body rewrite: the configured model and stream, numbers kept exactly, usage asked for
streamed answers, and the 400 for a body that is not a chat request."""

from __future__ import annotations

import json

import pytest

from extproc.dataplane.body_rewrite import rewrite_body
from extproc.errors import GatewayError
from extproc.policy.table import Target


def target(model: str | None = "qwen-turbo", stream: bool | None = None) -> Target:
    return Target(route="default/r", rule="rules[0]", provider="default/p", provider_host="p.example.com",
                  cluster="llm_provider_p_example_com", path="/v1/chat/completions", model=model, stream=stream,
                  api_key="sk-test")


MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("body", "tgt", "expected"), [
    pytest.param({"model": "gpt-4", "messages": MESSAGES}, target(), {"model": "qwen-turbo", "messages": MESSAGES},
                 id="model-replaced"),
    pytest.param({"messages": MESSAGES}, target(), {"messages": MESSAGES, "model": "qwen-turbo"}, id="model-added"),
    pytest.param({"model": "gpt-4", "messages": MESSAGES}, target(model=None), {"model": "gpt-4", "messages": MESSAGES},
                 id="no-config-model-keeps-client-model"),
    pytest.param({"messages": MESSAGES, "stream": True}, target(),
                 {"messages": MESSAGES, "stream": True, "model": "qwen-turbo",
                  "stream_options": {"include_usage": True}},
                 id="stream-none-keeps-true"),
    pytest.param({"messages": MESSAGES, "stream": False}, target(),
                 {"messages": MESSAGES, "stream": False, "model": "qwen-turbo"},
                 id="stream-none-keeps-false"),
    pytest.param({"messages": MESSAGES}, target(), {"messages": MESSAGES, "model": "qwen-turbo"},
                 id="stream-none-not-added"),
    pytest.param({"messages": MESSAGES, "stream": True}, target(stream=False),
                 {"messages": MESSAGES, "stream": False, "model": "qwen-turbo"}, id="stream-forced-false"),
    pytest.param({"messages": MESSAGES}, target(stream=True),
                 {"messages": MESSAGES, "model": "qwen-turbo", "stream": True,
                  "stream_options": {"include_usage": True}},
                 id="stream-forced-true-added"),
    pytest.param({"messages": MESSAGES, "stream": False}, target(stream=True),
                 {"messages": MESSAGES, "stream": True, "model": "qwen-turbo",
                  "stream_options": {"include_usage": True}},
                 id="stream-forced-true"),
    pytest.param({"model": "x", "messages": MESSAGES, "temperature": 0.2, "top_p": 1, "max_tokens": 64,
                  "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                  "stream": True, "stream_options": {"include_usage": True}, "user": "u-1", "n": None,
                  "metadata": {"unicode": "你好 ✓", "nested": [1, [2, {"k": None}]]}},
                 target(stream=False),
                 {"model": "qwen-turbo", "messages": MESSAGES, "temperature": 0.2, "top_p": 1, "max_tokens": 64,
                  "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
                  "stream": False, "user": "u-1", "n": None,
                  "metadata": {"unicode": "你好 ✓", "nested": [1, [2, {"k": None}]]}},
                 id="other-fields-kept-stream-options-dropped-with-the-stream"),
    pytest.param({"messages": [{"role": "system", "content": "s"},
                               {"role": "user", "content": [{"type": "text", "text": "t"}]}]},
                 target(), {"messages": [{"role": "system", "content": "s"},
                                         {"role": "user", "content": [{"type": "text", "text": "t"}]}],
                            "model": "qwen-turbo"},
                 id="messages-kept-verbatim"),
])
def test_rewrite_body(body, tgt, expected):
    out = rewrite_body(json.dumps(body, ensure_ascii=False).encode(), tgt).body
    parsed = json.loads(out)
    assert parsed == expected
    assert list(parsed) == list(expected)  # key order kept; a new key goes last


def test_rewrite_body_output_is_compact_utf8_json():
    out = rewrite_body('{"messages": [{"role": "user", "content": "héllo"}], "model": "m"}'.encode(), target()).body
    assert out == '{"messages":[{"role":"user","content":"héllo"}],"model":"qwen-turbo"}'.encode()


def _nested(depth: int) -> bytes:
    return b'{"messages":[{"role":"user","content":' + b"[" * depth + b"]" * depth + b"}]}"


@pytest.mark.parametrize(("body", "tgt", "code"), [
    pytest.param(b"not json", target(), "invalid_json", id="not-json"),
    pytest.param(b"", target(), "invalid_json", id="empty"),
    pytest.param(b'{"messages": [', target(), "invalid_json", id="truncated"),
    pytest.param(b'{"messages": [1],}', target(), "invalid_json", id="trailing-comma"),
    pytest.param(b'{"messages":[{"content":"\xff\xfe"}]}', target(), "invalid_json", id="invalid-utf8"),
    pytest.param(b"\xff\xfe", target(), "invalid_json", id="invalid-utf8-only"),
    pytest.param(b'{"messages": [{"content": NaN}]}', target(), "invalid_json", id="nan"),
    pytest.param(_nested(5000), target(), "invalid_json", id="nested-depth-5000"),
    pytest.param(b"[" * 5000 + b"]" * 5000, target(), "invalid_json", id="nested-array-depth-5000"),
    pytest.param(b'[{"messages": [1]}]', target(), "invalid_body", id="array"),
    pytest.param(b'"chat"', target(), "invalid_body", id="string"),
    pytest.param(b"42", target(), "invalid_body", id="number"),
    pytest.param(b"null", target(), "invalid_body", id="null"),
    pytest.param(b"true", target(), "invalid_body", id="bool"),
    pytest.param(b'{"model": "m"}', target(), "invalid_messages", id="messages-missing"),
    pytest.param(b'{"messages": []}', target(), "invalid_messages", id="messages-empty"),
    pytest.param(b'{"messages": "hi"}', target(), "invalid_messages", id="messages-string"),
    pytest.param(b'{"messages": {"role": "user"}}', target(), "invalid_messages", id="messages-object"),
    pytest.param(b'{"messages": null}', target(), "invalid_messages", id="messages-null"),
    pytest.param(b'{"messages": [1], "model": 5}', target(), "invalid_model", id="model-number"),
    pytest.param(b'{"messages": [1], "model": null}', target(), "invalid_model", id="model-null"),
    pytest.param(b'{"messages": [1], "model": ["m"]}', target(), "invalid_model", id="model-list"),
    pytest.param(b'{"messages": [1], "stream": "true"}', target(), "invalid_stream", id="stream-string"),
    pytest.param(b'{"messages": [1], "stream": 1}', target(), "invalid_stream", id="stream-number"),
    pytest.param(b'{"messages": [1], "stream": null}', target(stream=True), "invalid_stream", id="stream-null"),
    pytest.param(b'{"messages": [1]}', target(model=None), "missing_model", id="no-model-anywhere"),
    pytest.param(b'{"messages": [1], "model": ""}', target(model=None), "missing_model", id="empty-model-no-config"),
])
def test_bad_body_is_a_400(body, tgt, code):
    with pytest.raises(GatewayError) as info:
        rewrite_body(body, tgt)
    err = info.value
    assert (err.status, err.code) == (400, code)
    assert err.message and str(err) == err.message


@pytest.mark.parametrize(("body", "phrase"), [
    pytest.param(b"\xff\xfe", "invalid UTF-8", id="utf8"),
    pytest.param(b"{oops", "not valid JSON", id="json"),
    pytest.param(b"[]", "JSON object", id="object"),
    pytest.param(b'{"messages": []}', "'messages'", id="messages"),
])
def test_bad_body_message_says_what_is_wrong(body, phrase):
    with pytest.raises(GatewayError) as info:
        rewrite_body(body, target())
    assert phrase in info.value.message


@pytest.mark.parametrize("extra", [
    pytest.param(b'"seed": 123456789012345678901234567890', id="top-level"),
    pytest.param(b'"logit_bias": {"9": -100000000000000000000000}', id="negative-in-object"),
    pytest.param(b'"ids": [1, [2, 99999999999999999999]]', id="nested-in-arrays"),
    pytest.param(b'"seed": 18446744073709551615', id="largest-unsigned-64-bit"),
    pytest.param(b'"seed": -9223372036854775809', id="just-below-signed-64-bit"),
    pytest.param(b'"x": 1e20, "y": 1.5e300', id="float-literals"),
    pytest.param(b'"note": "12345678901234567890123 in a string"', id="digits-in-a-string"),
])
def test_numbers_kept_exactly(extra):
    body = b'{"messages": [{"role": "user", "content": "hi"}], "t": 0.5, ' + extra + b"}"
    out = rewrite_body(body, target(model="m")).body
    assert json.loads(out) == {**json.loads(body), "model": "m"}  # json reads integers exactly
    assert all(type(a) is type(b) for a, b in zip(_leaves(json.loads(out)), _leaves(json.loads(body)), strict=True))


def _leaves(value):
    if isinstance(value, dict):
        for key in sorted(value):
            if key != "model":
                yield from _leaves(value[key])
    elif isinstance(value, list):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


@pytest.mark.parametrize(("options", "expected"), [
    pytest.param({"include_usage": False}, {"include_usage": True}, id="client-said-no"),
    pytest.param({"include_usage": True}, {"include_usage": True}, id="client-said-yes"),
    pytest.param({"continuous_usage_stats": True}, {"continuous_usage_stats": True, "include_usage": True},
                 id="other-option-kept"),
])
def test_streamed_request_asks_for_usage(options, expected):
    out = rewrite_body(json.dumps({"messages": MESSAGES, "stream": True, "stream_options": options}).encode(), target())
    assert out.stream is True and out.model == "qwen-turbo"
    assert json.loads(out.body)["stream_options"] == expected


def test_non_streamed_request_gets_no_stream_options():
    out = rewrite_body(json.dumps({"messages": MESSAGES}).encode(), target(stream=False))
    assert out.stream is False
    assert "stream_options" not in json.loads(out.body)


def test_stream_options_of_wrong_type_is_a_400():
    with pytest.raises(GatewayError) as info:
        rewrite_body(json.dumps({"messages": MESSAGES, "stream": True, "stream_options": "yes"}).encode(), target())
    assert info.value.status == 400 and info.value.code == "invalid_stream_options"


@pytest.mark.parametrize(("body", "expected"), [
    pytest.param({"messages": MESSAGES}, (False, False), id="no-stream"),
    pytest.param({"messages": MESSAGES, "stream": True}, (True, False), id="stream-no-usage"),
    pytest.param({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}, (True, True),
                 id="stream-with-usage"),
    pytest.param({"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": False}}, (True, False),
                 id="stream-usage-declined"),
    pytest.param({"messages": MESSAGES, "stream": False, "stream_options": {"include_usage": True}}, (False, False),
                 id="usage-without-stream-is-no-ask"),
])
@pytest.mark.parametrize("forced", [None, True, False])
def test_what_the_client_asked_for_is_kept_whatever_the_config_forces(body, expected, forced):
    """The answer's format follows the client's own `stream` and usage ask, not the config's."""
    out = rewrite_body(json.dumps(body).encode(), target(stream=forced))
    assert (out.client_stream, out.include_usage) == expected


@pytest.mark.parametrize(("client_stream", "forced", "sent"), [
    pytest.param(True, None, True, id="retry-keeps-the-client-stream"),
    pytest.param(False, None, False, id="retry-keeps-the-client-json"),
    pytest.param(True, False, False, id="config-wins-over-the-client"),
    pytest.param(False, True, True, id="config-forces-a-stream"),
])
def test_a_retry_asks_for_the_clients_stream_where_the_config_sets_none(client_stream, forced, sent):
    """A retried attempt gets the previous attempt's body, whose `stream` may be its provider's."""
    previous = {"messages": MESSAGES, "model": "m", "stream": not client_stream}
    out = rewrite_body(json.dumps(previous).encode(), target(stream=forced), client_stream=client_stream)
    assert out.stream is sent
    body = json.loads(out.body)
    assert body["stream"] is sent
    assert ("stream_options" in body) is sent


def test_a_stream_turned_off_by_the_config_drops_its_options():
    """OpenAI refuses `stream_options` without a stream: the gateway's own change must not cause a 400."""
    sent = {"messages": MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
    out = rewrite_body(json.dumps(sent).encode(), target(stream=False))
    assert json.loads(out.body) == {"messages": MESSAGES, "stream": False, "model": "qwen-turbo"}
