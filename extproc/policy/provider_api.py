"""Which API a provider speaks, and what that means for a request sent to it. Pure decisions.

An LLMProvider speaks OpenAI's API (`openAIConfig`, the seed's DashScope and Moonshot), or, by
our extension fields, Azure OpenAI's (`azureOpenAIConfig`: OpenAI's bodies, its own paths and
key header), Anthropic's Messages API (`anthropicConfig`), Google's Gemini API (`geminiConfig`)
or Amazon Bedrock's Converse API (`bedrockConfig`). A client speaks OpenAI's API (chat,
completions, embeddings) or Anthropic's Messages API (`POST .../messages`): `Endpoint.client_api`.

Here: the names of the APIs, what a target of each needs besides its model and key
(`ApiSettings`, on `Target`), the headers that carry each API's credentials (`credential_headers`: every
attempt sets its own and removes every other), the path a request is sent to
(`static_path`, or per request for APIs whose path names the model or the stream), which
endpoints each API serves, and a client's own headers that another API's provider does not get
(docs/translation.md). Whether a request's answer comes back to be translated is
`extproc.policy.answer_format`; the translations themselves are `extproc.translation`.
"""

from __future__ import annotations

from urllib.parse import quote

from ..errors import GatewayError
from . import openai_api
from .openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, Endpoint
from .table import OPENAI_API, ApiSettings, Target

OPENAI = OPENAI_API
AZURE = "azure"
ANTHROPIC = "anthropic"
GEMINI = "gemini"
BEDROCK = "bedrock"
APIS = (OPENAI, AZURE, ANTHROPIC, GEMINI, BEDROCK)
NAMES = {OPENAI: "OpenAI's API", AZURE: "Azure OpenAI", ANTHROPIC: "Anthropic's Messages API",
         GEMINI: "the Gemini API", BEDROCK: "Bedrock's Converse API"}

NO_SETTINGS = ApiSettings()
DEFAULT_ANTHROPIC_VERSION = NO_SETTINGS.anthropic_version
DEFAULT_ANTHROPIC_MAX_TOKENS = NO_SETTINGS.max_tokens
DEFAULT_GEMINI_API_VERSION = "v1beta"
DEFAULT_AZURE_API_VERSION = "2024-10-21"

# Every request header that carries a credential to some provider API. An attempt sets its own
# provider's and removes all others: a client's key never reaches a provider, and one provider's
# key never another.
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "api-key", "x-goog-api-key", "x-amz-security-token")



def credential_headers(target: Target) -> tuple[tuple[str, str], ...]:
    """The headers that carry this target's credential on every attempt (its API's own header;
    none without a key). Bedrock's is a signature over the whole request: set per request
    (`extproc.translation.bedrock.sign`)."""
    api, key = target.api, target.api_key
    if api == ANTHROPIC:
        version = (target.api_settings or NO_SETTINGS).anthropic_version
        return ((("x-api-key", key),) if key else ()) + (("anthropic-version", version),)
    if not key or api == BEDROCK:
        return ()
    if api == AZURE:
        return (("api-key", key),)
    if api == GEMINI:
        return (("x-goog-api-key", key),)
    return (("authorization", f"Bearer {key}"),)


def removed_credentials(target: Target) -> tuple[str, ...]:
    """The credential headers an attempt to `target` removes: every one it does not set."""
    kept = {name for name, _ in credential_headers(target)}
    return tuple(name for name in CREDENTIAL_HEADERS if name not in kept)


# The headers of Anthropic's API a client of it sends (besides its key): meaningless to a provider
# of another API, so they do not reach one.
ANTHROPIC_CLIENT_HEADERS = ("anthropic-version", "anthropic-beta")


def foreign_headers(endpoint: Endpoint, target: Target) -> tuple[str, ...]:
    """The client's API's own headers an attempt to `target` removes: an Anthropic client's
    `anthropic-*` headers where the provider speaks another API (none for OpenAI's clients)."""
    if endpoint.client_api == ANTHROPIC and target.api != ANTHROPIC:
        return ANTHROPIC_CLIENT_HEADERS
    return ()


def serves(target: Target, endpoint: Endpoint) -> None:
    """Raise a 404 naming the provider and its API for an endpoint its API has no counterpart
    for: embeddings and completions exist only in OpenAI's API (and Azure's)."""
    if target.body_api == OPENAI or endpoint is CHAT or endpoint is MESSAGES:
        return
    raise GatewayError(404, f"provider {target.provider} speaks {NAMES[target.api]}, which has no "
                            f"{endpoint.name} endpoint: only chat (and .../messages) requests can be sent to it",
                       "unsupported_endpoint")


def static_path(endpoint: Endpoint, target: Target) -> str | None:
    """The path a request for `endpoint` is sent to when it is the same for every request to
    `target`; None where it depends on the request (Gemini and Bedrock name the model and the
    stream in it: `request_path`). A 404 for an endpoint the provider cannot serve."""
    serves(target, endpoint)
    api = target.api
    if api == OPENAI:
        return openai_api.upstream_path(CHAT if endpoint is MESSAGES else endpoint, target)
    if api == AZURE:
        settings = target.api_settings or NO_SETTINGS
        deployment = settings.deployment
        if endpoint is EMBEDDINGS:
            if settings.embedding_deployment is None:
                raise GatewayError(404, f"provider {target.provider} names no embeddingDeployment in its "
                                        "azureOpenAIConfig", "unsupported_endpoint")
            deployment = settings.embedding_deployment
        name = COMPLETIONS.name if endpoint is COMPLETIONS else EMBEDDINGS.name if endpoint is EMBEDDINGS \
            else CHAT.name
        return f"/openai/deployments/{quote(deployment, safe='')}/{name}?api-version={settings.api_version}"
    if api == ANTHROPIC:
        return f"{target.base_path or '/v1'}/messages"
    return None


def request_path(target: Target, model: str, stream: bool) -> str:
    """The path of one request to a Gemini or Bedrock provider: its model and whether it streams."""
    if target.api == GEMINI:
        version = (target.api_settings or NO_SETTINGS).api_version or DEFAULT_GEMINI_API_VERSION
        method = "streamGenerateContent?alt=sse" if stream else "generateContent"
        return f"/{version}/models/{quote(model, safe='')}:{method}"
    if target.api == BEDROCK:
        return f"/model/{quote(model, safe='')}/{'converse-stream' if stream else 'converse'}"
    raise ValueError(f"the path of a {target.api} request is static")
