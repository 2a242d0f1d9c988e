"""The fake providers of other APIs are as strict as the real ones (what makes the translation tests
worth something): Anthropic refuses a request without `max_tokens`, with a `system` message, with
an unknown field, a tool result without its tool use, a wrong key or no `anthropic-version`;
Gemini refuses unknown fields and a missing key; Bedrock recomputes every SigV4 signature with
botocore (no signature, another secret, a body changed after signing: refused) and checks the
body against botocore's model of Converse; Azure needs its deployment, `api-version` and `api-key`.
Requests straight to the fakes, over TLS with the test CA."""

from __future__ import annotations

import http.client
import json
import ssl
from urllib.parse import quote

import pytest

from extproc.demo.fake_provider import FakeProvider
from extproc.policy.table import ApiSettings
from extproc.translation.bedrock import sign

KEY, AWS_ID, AWS_SECRET = "sk-fake-key", "AKIAFAKE", "fake-secret"
HOST = "provider.test"


@pytest.fixture(scope="module")
def fakes(ca):
    cert = ca.issue([HOST])
    made = {"anthropic": FakeProvider("a", cert.cert_file, cert.key_file, api="anthropic", api_key=KEY),
            "gemini": FakeProvider("g", cert.cert_file, cert.key_file, api="gemini", api_key=KEY),
            "bedrock": FakeProvider("b", cert.cert_file, cert.key_file, api="bedrock", aws_access_key_id=AWS_ID,
                                    aws_secret_access_key=AWS_SECRET),
            "azure": FakeProvider("z", cert.cert_file, cert.key_file, api="azure", api_key=KEY,
                                  azure_deployments={"prod": "gpt-4o"})}
    for fake in made.values():
        fake.start()
    yield made
    for fake in made.values():
        fake.stop()


def post(ca, fake: FakeProvider, path: str, body: bytes | dict, headers: dict[str, str]) -> tuple[int, dict]:
    context = ssl.create_default_context(cafile=str(ca.cert_file))
    context.check_hostname = False  # the fakes' certificate names HOST; dialled by address here
    connection = http.client.HTTPSConnection("127.0.0.1", fake.port, context=context, timeout=10)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    connection.request("POST", path, body=raw, headers={"host": HOST, "content-type": "application/json", **headers})
    response = connection.getresponse()
    data = response.read()
    connection.close()
    return response.status, json.loads(data) if data.startswith(b"{") else {"raw": data.decode()}


ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
MESSAGE = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    (MESSAGE, ANTHROPIC_HEADERS, 200, None),
    ({k: v for k, v in MESSAGE.items() if k != "max_tokens"}, ANTHROPIC_HEADERS, 400, "max_tokens: Field required"),
    ({**MESSAGE, "messages": [{"role": "system", "content": "Be brief."}, *MESSAGE["messages"]]}, ANTHROPIC_HEADERS,
     400, 'Unexpected role "system"'),
    ({**MESSAGE, "stream_options": {"include_usage": True}}, ANTHROPIC_HEADERS, 400, "Extra inputs are not permitted"),
    ({**MESSAGE, "messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                                           "content": "x"}]}]}, ANTHROPIC_HEADERS, 400,
     "corresponding `tool_use` block"),
    ({**MESSAGE, "temperature": 1.5}, ANTHROPIC_HEADERS, 400, "less than or equal to 1"),
    (MESSAGE, {"x-api-key": "wrong", "anthropic-version": "2023-06-01"}, 401, "invalid x-api-key"),
    (MESSAGE, {"x-api-key": KEY}, 400, "anthropic-version"),
])
def test_anthropic_is_strict(ca, fakes, body, headers, status, words):
    got, answer = post(ca, fakes["anthropic"], "/v1/messages", body, headers)
    assert got == status, answer
    if words:
        assert answer["type"] == "error" and words in answer["error"]["message"]


@pytest.mark.parametrize(("body", "headers", "status", "words"), [
    ({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}, {"x-goog-api-key": KEY}, 200, None),
    ({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}], "messages": []}, {"x-goog-api-key": KEY}, 400,
     'Unknown name "messages"'),
    ({"contents": [{"role": "assistant", "parts": [{"text": "Hi"}]}]}, {"x-goog-api-key": KEY}, 400, "valid role"),
    ({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}], "generationConfig": {"max_tokens": 5}},
     {"x-goog-api-key": KEY}, 400, 'Unknown name "max_tokens"'),
    ({"contents": [{"role": "user", "parts": [{"text": "Hi"}]}]}, {}, 403, "unregistered callers"),
])
def test_gemini_is_strict(ca, fakes, body, headers, status, words):
    got, answer = post(ca, fakes["gemini"], "/v1beta/models/gemini-2.5-flash:generateContent", body, headers)
    assert got == status, answer
    if words:
        assert words in answer["error"]["message"]


CONVERSE = {"messages": [{"role": "user", "content": [{"text": "Hi"}]}], "inferenceConfig": {"maxTokens": 5}}
PATH = f"/model/{quote('anthropic.claude-3-5-haiku-20241022-v1:0', safe='')}/converse"


def signed(body: bytes, secret: str = AWS_SECRET, path: str = PATH) -> dict[str, str]:
    return dict(sign(ApiSettings(region="us-east-1", access_key_id=AWS_ID, secret_access_key=secret), HOST, path, body))


def test_bedrock_checks_every_signature(ca, fakes):
    body = json.dumps(CONVERSE).encode()
    assert post(ca, fakes["bedrock"], PATH, body, signed(body))[0] == 200
    status, answer = post(ca, fakes["bedrock"], PATH, body, {})
    assert status == 403 and answer["message"] == "Missing Authentication Token"
    status, answer = post(ca, fakes["bedrock"], PATH, body, signed(body, secret="another"))
    assert status == 403 and "signature we calculated does not match" in answer["message"]
    status, answer = post(ca, fakes["bedrock"], PATH, body + b" ", signed(body))  # changed after signing
    assert status == 403 and "does not match" in answer["message"]
    stream_path = PATH.replace("/converse", "/converse-stream")
    assert post(ca, fakes["bedrock"], stream_path, body, signed(body))[0] == 403  # signed for another path


@pytest.mark.parametrize(("body", "words"), [
    ({**CONVERSE, "max_tokens": 5}, 'Unknown parameter in input: "max_tokens"'),
    ({"messages": [{"role": "user", "content": [{"text": "Hi"}]}, {"role": "user", "content": [{"text": "Hi"}]}]},
     "must alternate"),
    ({"messages": [{"role": "user", "content": [{"image": {"format": "bmp", "source": {"bytes": "AAAA"}}}]}]},
     "'bmp' is not one of png, jpeg, gif, webp"),
])
def test_bedrock_checks_the_body_against_botocores_model(ca, fakes, body, words):
    raw = json.dumps(body).encode()
    status, answer = post(ca, fakes["bedrock"], PATH, raw, signed(raw))
    assert status == 400 and words in answer["message"], answer


@pytest.mark.parametrize(("path", "headers", "status"), [
    ("/openai/deployments/prod/chat/completions?api-version=2024-10-21", {"api-key": KEY}, 200),
    ("/openai/deployments/prod/chat/completions", {"api-key": KEY}, 404),  # no api-version
    ("/openai/deployments/prod/chat/completions?api-version=2024-10-21", {"authorization": f"Bearer {KEY}"}, 401),
    ("/openai/deployments/other/chat/completions?api-version=2024-10-21", {"api-key": KEY}, 404),
])
def test_azure_needs_its_deployment_api_version_and_api_key(ca, fakes, path, headers, status):
    got, answer = post(ca, fakes["azure"], path, {"messages": [{"role": "user", "content": "Hi"}]}, headers)
    assert got == status, answer
    if status == 200:
        assert answer["model"] == "gpt-4o"
