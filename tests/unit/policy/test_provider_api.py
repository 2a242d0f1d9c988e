"""Which API a provider speaks and what that means for a request: each API's credential headers
(every attempt sets its own and removes every other), its paths, the endpoints it serves, a
client's own headers."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extproc.errors import GatewayError
from extproc.policy import provider_api
from extproc.policy.openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES
from extproc.policy.table import ApiSettings
from support.table_parts import target

BASE = replace(target("p"), api_key="k-1")


@pytest.mark.parametrize(("api", "settings", "expected"), [
    ("openai", None, (("authorization", "Bearer k-1"),)),
    ("azure", ApiSettings(deployment="d"), (("api-key", "k-1"),)),
    ("anthropic", ApiSettings(anthropic_version="2023-06-01"), (("x-api-key", "k-1"),
                                                                 ("anthropic-version", "2023-06-01"))),
    ("gemini", None, (("x-goog-api-key", "k-1"),)),
    ("bedrock", ApiSettings(region="us-east-1"), ()),  # a signature per request instead
])
def test_each_api_carries_its_key_in_its_own_header_and_every_other_one_goes(api, settings, expected):
    t = replace(BASE, api=api, api_settings=settings)
    assert provider_api.credential_headers(t) == expected
    removed = provider_api.removed_credentials(t)
    assert set(removed) | {name for name, _ in expected} >= set(provider_api.CREDENTIAL_HEADERS)
    assert not set(removed) & {name for name, _ in expected}


def test_no_key_no_credential_header():
    assert provider_api.credential_headers(replace(BASE, api_key=None)) == ()
    assert "authorization" in provider_api.removed_credentials(replace(BASE, api_key=None))


@pytest.mark.parametrize(("api", "settings", "endpoint", "path"), [
    ("openai", None, MESSAGES, "/v1/chat/completions"),
    ("azure", ApiSettings(deployment="gpt 4o", api_version="2024-10-21"), CHAT,
     "/openai/deployments/gpt%204o/chat/completions?api-version=2024-10-21"),
    ("azure", ApiSettings(deployment="d", embedding_deployment="e", api_version="v"), EMBEDDINGS,
     "/openai/deployments/e/embeddings?api-version=v"),
    ("azure", ApiSettings(deployment="d", api_version="v"), COMPLETIONS,
     "/openai/deployments/d/completions?api-version=v"),
    ("anthropic", None, CHAT, "/v1/messages"),
    ("gemini", None, CHAT, None),  # per request: the model and the stream are in it
    ("bedrock", None, MESSAGES, None),
])
def test_static_paths(api, settings, endpoint, path):
    assert provider_api.static_path(endpoint, replace(BASE, api=api, api_settings=settings)) == path


def test_an_anthropic_base_path():
    assert provider_api.static_path(CHAT, replace(BASE, api="anthropic", base_path="/anthropic/v1")) == \
        "/anthropic/v1/messages"


def test_per_request_paths():
    gemini = replace(BASE, api="gemini", api_settings=ApiSettings(api_version="v1"))
    assert provider_api.request_path(gemini, "gemini-2.5-flash", False) == "/v1/models/gemini-2.5-flash:generateContent"
    assert provider_api.request_path(replace(BASE, api="gemini"), "m", True) == \
        "/v1beta/models/m:streamGenerateContent?alt=sse"
    bedrock = replace(BASE, api="bedrock")
    assert provider_api.request_path(bedrock, "anthropic.claude-3-5-haiku-20241022-v1:0", True) == \
        "/model/anthropic.claude-3-5-haiku-20241022-v1%3A0/converse-stream"


@pytest.mark.parametrize("api", ["anthropic", "gemini", "bedrock"])
@pytest.mark.parametrize("endpoint", [EMBEDDINGS, COMPLETIONS])
def test_only_chat_goes_to_a_provider_of_another_api(api, endpoint):
    with pytest.raises(GatewayError) as refused:
        provider_api.static_path(endpoint, replace(BASE, api=api))
    assert refused.value.status == 404 and refused.value.code == "unsupported_endpoint"
    assert endpoint.name in refused.value.message and "ns/p" in refused.value.message


def test_azure_embeddings_need_their_deployment():
    with pytest.raises(GatewayError, match="embeddingDeployment"):
        provider_api.static_path(EMBEDDINGS, replace(BASE, api="azure", api_settings=ApiSettings(deployment="d")))


def test_an_anthropic_clients_own_headers_reach_only_anthropic():
    assert provider_api.foreign_headers(MESSAGES, replace(BASE, api="gemini")) == ("anthropic-version",
                                                                                   "anthropic-beta")
    assert provider_api.foreign_headers(MESSAGES, replace(BASE, api="anthropic")) == ()
    assert provider_api.foreign_headers(CHAT, replace(BASE, api="gemini")) == ()
