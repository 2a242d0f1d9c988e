"""OpenAI's chat API -> Bedrock's Converse API and back: the request checked against botocore's own
model of ConverseRequest (what the AWS SDKs validate with), answers and the binary event stream
(decoded by botocore, whatever its chunks), errors, and the SigV4 signature: recomputed by
botocore from the signed request, a new one per call, never the secret in it."""

from __future__ import annotations

import base64
import json
import re

import botocore.session
import pytest
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.validate import ParamValidator

from extproc.demo.fake_apis import frame
from extproc.errors import GatewayError
from extproc.policy.table import ApiSettings
from extproc.translation import bedrock
from support.api_shapes import CONVERSE_ANSWER, CONVERSE_ERROR

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
IMAGE = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}}
LOOKUP = {"id": "tooluse_1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": 1}'}}
SETTINGS = ApiSettings(region="eu-west-1", access_key_id="AKIAEXAMPLE", secret_access_key="secret-example")
REQUEST = {
    "messages": [{"role": "system", "content": "Be brief."},
                 {"role": "user", "content": [{"type": "text", "text": "What is this?"}, IMAGE]},
                 {"role": "assistant", "content": "Let me look.", "tool_calls": [LOOKUP]},
                 {"role": "tool", "tool_call_id": "tooluse_1", "content": "a PNG"},
                 {"role": "user", "content": "Thanks"}],
    "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}],
    "tool_choice": "auto", "max_tokens": 200, "temperature": 0.3, "top_p": 0.8, "stop": "END",
}


def converse_input_shape():
    return botocore.session.get_session().get_service_model("bedrock-runtime").operation_model("Converse").input_shape


def test_a_request_as_converse_and_valid_for_botocores_model():
    out = bedrock.to_converse_request(REQUEST)
    assert out["system"] == [{"text": "Be brief."}]
    assert out["messages"] == [
        {"role": "user", "content": [{"text": "What is this?"},
                                     {"image": {"format": "png", "source": {"bytes": PNG}}}]},
        {"role": "assistant", "content": [
            {"text": "Let me look."}, {"toolUse": {"toolUseId": "tooluse_1", "name": "lookup", "input": {"q": 1}}}]},
        {"role": "user", "content": [{"toolResult": {"toolUseId": "tooluse_1", "content": [{"text": "a PNG"}]}},
                                     {"text": "Thanks"}]}]
    assert out["inferenceConfig"] == {"maxTokens": 200, "temperature": 0.3, "topP": 0.8, "stopSequences": ["END"]}
    assert out["toolConfig"] == {
        "tools": [{"toolSpec": {"name": "lookup", "inputSchema": {"json": {"type": "object"}}}}],
        "toolChoice": {"auto": {}}}
    params = json.loads(json.dumps(out))
    params["messages"][0]["content"][1]["image"]["source"]["bytes"] = base64.b64decode(PNG)
    report = ParamValidator().validate({**params, "modelId": "anthropic.claude-3-5-haiku-20241022-v1:0"},
                                       converse_input_shape())
    assert not report.has_errors(), report.generate_report()


@pytest.mark.parametrize(("data", "words"), [
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x/a.png"}}]}]},
     "image by URL"),
    ({"messages": [{"role": "user", "content": "Hi"}], "n": 3}, "n other than 1"),
])
def test_what_converse_cannot_carry(data, words):
    with pytest.raises(GatewayError) as refused:
        bedrock.to_converse_request(data)
    assert refused.value.status == 400 and words in refused.value.message


def test_an_answer_with_reasoning_a_tool_use_and_cached_tokens():
    out = bedrock.answer_to_openai(CONVERSE_ANSWER, "m-1", "req-1")
    assert (out["id"], out["model"]) == ("req-1", "m-1")
    choice = out["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {"role": "assistant", "content": "Here is the weather.",
                                 "reasoning_content": "Thinking.", "tool_calls": [
                                     {"id": "tooluse_kZJMlvQmRJ6eAyJE5GIl7Q", "type": "function",
                                      "function": {"name": "top_song", "arguments": '{"sign":"WZPZ"}'}}]}
    # the prompt: 30 uncached + 10 read from the cache
    assert out["usage"] == {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60,
                            "prompt_tokens_details": {"cached_tokens": 10}}


def test_an_error_with_its_type_header():
    assert bedrock.error_to_openai(400, CONVERSE_ERROR, "ValidationException:http://internal.amazon.com/x") == {
        "error": {"message": CONVERSE_ERROR["message"], "type": "invalid_request_error", "code": "ValidationException"}}


STREAM = b"".join([
    frame("messageStart", {"role": "assistant"}),
    frame("contentBlockDelta", {"delta": {"text": "Hello"}, "contentBlockIndex": 0}),
    frame("contentBlockDelta", {"delta": {"reasoningContent": {"text": "hm"}}, "contentBlockIndex": 0}),
    frame("contentBlockStop", {"contentBlockIndex": 0}),
    frame("contentBlockStart", {"start": {"toolUse": {"toolUseId": "t1", "name": "f"}}, "contentBlockIndex": 1}),
    frame("contentBlockDelta", {"delta": {"toolUse": {"input": '{"a":'}}, "contentBlockIndex": 1}),
    frame("contentBlockDelta", {"delta": {"toolUse": {"input": " 1}"}}, "contentBlockIndex": 1}),
    frame("contentBlockStop", {"contentBlockIndex": 1}),
    frame("messageStop", {"stopReason": "tool_use"}),
    frame("metadata", {"usage": {"inputTokens": 12, "outputTokens": 6, "totalTokens": 18},
                       "metrics": {"latencyMs": 9}}),
])


@pytest.mark.parametrize("piece", [1, 7, 64, len(STREAM)])
def test_the_event_stream_into_chunks(piece):
    decoder = bedrock.BedrockStreamDecoder("m-1", "req-1")
    chunks = []
    for i in range(0, len(STREAM), piece):
        chunks.extend(decoder.feed(STREAM[i:i + piece]))
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    assert [d.get("content") for d in deltas if d.get("content")] == ["Hello"]
    assert [d["reasoning_content"] for d in deltas if "reasoning_content" in d] == ["hm"]
    calls = [c for d in deltas for c in d.get("tool_calls", ())]
    assert calls[0]["id"] == "t1" and "".join(c["function"]["arguments"] for c in calls) == '{"a": 1}'
    assert chunks[-1]["usage"] == {"prompt_tokens": 12, "completion_tokens": 6, "total_tokens": 18}
    assert decoder.complete and all(c["model"] == "m-1" and c["id"] == "req-1" for c in chunks)


def test_an_exception_in_the_stream_and_a_corrupt_frame():
    decoder = bedrock.BedrockStreamDecoder()
    (chunk,) = decoder.feed(frame("throttlingException", {"message": "Too many tokens"}, "exception"))
    assert chunk == {"error": {"message": "Too many tokens", "type": "server_error", "code": "throttlingException"}}
    broken = bytearray(frame("messageStart", {"role": "assistant"}))
    broken[-1] ^= 0xFF  # the message's CRC no longer matches
    decoder = bedrock.BedrockStreamDecoder()
    (chunk,) = decoder.feed(bytes(broken))
    assert chunk["error"]["code"] == "corrupt_event_stream" and decoder.feed(STREAM) == []


def verify(headers: dict[str, str], host: str, path: str, body: bytes, settings: ApiSettings) -> bool:
    """As the fake provider (and AWS) checks a signature: recomputed with botocore over the signed headers."""
    found = re.match(r"AWS4-HMAC-SHA256 Credential=([^/]+)/(\d{8})/([^/]+)/bedrock/aws4_request, "
                     r"SignedHeaders=([^,]+), Signature=(\w+)", headers["authorization"])
    assert found is not None
    key_id, _, region, signed, signature = found.groups()
    assert (key_id, region) == (settings.access_key_id, settings.region)
    every = {"host": host, "content-type": "application/json", **headers}
    request = AWSRequest(method="POST", url=f"https://{host}{path}", data=body,
                         headers={name: every[name] for name in signed.split(";")})
    request.context["timestamp"] = headers["x-amz-date"]
    signer = SigV4Auth(Credentials(settings.access_key_id, settings.secret_access_key, settings.session_token),
                       "bedrock", region)
    return signer.signature(signer.string_to_sign(request, signer.canonical_request(request)), request) == signature


def test_a_signature_botocore_recomputes_for_the_exact_body_and_path():
    host, path, body = "bedrock-runtime.eu-west-1.amazonaws.com", "/model/a.b-v1%3A0/converse", b'{"messages":[]}'
    signed = dict(bedrock.sign(SETTINGS, host, path, body))
    assert set(signed) == {"authorization", "x-amz-date"}
    assert "secret-example" not in repr(signed) and "secret-example" not in repr(SETTINGS)
    assert verify(signed, host, path, body, SETTINGS)
    assert not verify(signed, host, path, body + b" ", SETTINGS)  # another body: another signature
    assert not verify(signed, host, path.replace("converse", "converse-stream"), body, SETTINGS)


def test_a_session_token_is_signed_and_sent():
    settings = ApiSettings(region="us-east-1", access_key_id="ASIAEXAMPLE", secret_access_key="s",
                           session_token="token-1")
    signed = dict(bedrock.sign(settings, "h.test", "/model/m/converse", b"{}"))
    assert signed["x-amz-security-token"] == "token-1"
    assert "x-amz-security-token" in signed["authorization"]
    assert verify(signed, "h.test", "/model/m/converse", b"{}", settings)
