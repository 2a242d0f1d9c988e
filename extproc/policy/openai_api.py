"""Which OpenAI endpoint a request calls, and what that endpoint needs. Pure decisions.

Applications use the gateway as an OpenAI base URL, so a request's endpoint is the part of its
path after the client's base: `/v1`, a provider's own base path (`/compatible-mode/v1` for
DashScope), or nothing at all (`POST /`, the seed's plain curl, is a chat request). Chat,
completions and embeddings are routed alike (same rules, weights, key and TLS) and differ only in
the body field they require, where the model comes from and the path sent upstream. The model
list is answered by the gateway itself, from the config.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

import orjson

from ..errors import GatewayError
from .table import DEFAULT_BASES, Route, Target

CHAT_SUFFIX = "/chat/completions"


@dataclass(frozen=True, slots=True, eq=False)  # singletons: compared and hashed by identity
class Endpoint:
    name: str  # the path after the base, without the leading slash
    method: str
    operation: str  # gen_ai_operation_name (OpenTelemetry GenAI) in metrics and the access log
    required: str | None  # the body field the request must have
    streams: bool  # may be answered as server-sent events
    client_api: str = "openai"  # the API the client speaks (see `extproc.policy.provider_api`)


CHAT = Endpoint("chat/completions", "POST", "chat", "messages", True)
COMPLETIONS = Endpoint("completions", "POST", "text_completion", "prompt", True)
EMBEDDINGS = Endpoint("embeddings", "POST", "embeddings", "input", False)
MODELS = Endpoint("models", "GET", "models", None, False)
# Anthropic's Messages API, beside OpenAI's: a chat request in Anthropic's shape, routed by the
# same rules to any provider (translated where the provider speaks another API; docs/translation.md)
MESSAGES = Endpoint("messages", "POST", "chat", "messages", True, "anthropic")
ENDPOINTS = {e.name: e for e in (CHAT, COMPLETIONS, EMBEDDINGS, MODELS, MESSAGES)}
_BY_OPERATION = {e.operation: e for e in (CHAT, COMPLETIONS, EMBEDDINGS, MODELS)}  # chat: OpenAI's


def endpoint_of_operation(operation: str) -> Endpoint:
    """The endpoint a metric's `gen_ai_operation_name` names (chat where it is unknown)."""
    return _BY_OPERATION.get(operation, CHAT)

SUPPORTED = ("POST .../chat/completions, POST .../completions, POST .../embeddings, GET .../models, "
             "POST .../messages (Anthropic's Messages API)")


def base_path(path: str, declared: str | None) -> str | None:
    """A provider's base path: `spec.basePath` if set, else `spec.path` without its trailing
    `/chat/completions`; None when neither says it (then only chat can reach that provider)."""
    if declared is not None:
        return declared.rstrip("/")
    if path.endswith(CHAT_SUFFIX):
        return path[: -len(CHAT_SUFFIX)]
    return None


def route_bases(targets: Iterable[Target]) -> frozenset[str]:
    """The client base paths a route accepts: `/v1`, none, and its providers' base paths."""
    return frozenset((*DEFAULT_BASES, *(t.base_path for t in targets if t.base_path is not None)))


@lru_cache(maxsize=1024)  # a few distinct paths per route: recognized once (a frozenset keeps its hash)
def recognize(method: str, path: str, bases: frozenset[str]) -> Endpoint:
    """The endpoint a request calls, from its method and path (query string ignored). A path
    that is no endpoint is a 404 and a wrong method a 405, each naming what is supported."""
    path = path.split("?", 1)[0].rstrip("/")
    endpoint, best = None, ""
    if path in bases:  # `POST /`, `POST /v1`: a chat request, as the seed's curl sends it
        endpoint = CHAT
    else:
        for base in bases:
            if path.startswith(base + "/"):
                found = ENDPOINTS.get(path[len(base) + 1:])
                if found is not None and (endpoint is None or len(base) > len(best)):
                    endpoint, best = found, base
    if endpoint is None:
        refused = GatewayError(404, f"no endpoint at path {path or '/'!r}: this gateway serves {SUPPORTED}",
                               "unknown_endpoint")
        if any(path.startswith(f"{base}/{MODELS.name}/") for base in bases):  # retrieving one model
            refused.operation = MODELS.operation
        raise refused
    if method != endpoint.method:
        raise GatewayError(405, f"method {method} not allowed on {endpoint.name}: send a {endpoint.method}"
                           f" ({SUPPORTED})", "method_not_allowed")
    return endpoint


def upstream_path(endpoint: Endpoint, target: Target) -> str:
    """The path the provider is sent: its chat path as configured, else its base path plus the
    endpoint. A provider without a base path can be reached for chat only (a 404 otherwise)."""
    if endpoint is CHAT:
        return target.path
    if target.base_path is None:
        raise GatewayError(404, f"provider {target.provider} has no base path for {endpoint.name}: its spec.path"
                           f" does not end in {CHAT_SUFFIX} and it sets no spec.basePath", "unsupported_endpoint")
    return f"{target.base_path}/{endpoint.name}"


def check_body(endpoint: Endpoint, data: dict[str, object]) -> None:
    """The endpoint's own required field, with OpenAI's accepted shapes (400 otherwise)."""
    field = endpoint.required
    value = data.get(field) if field else None
    if endpoint is CHAT:
        if not isinstance(value, list) or not value:
            raise GatewayError(400, "'messages' must be a non-empty array", "invalid_messages")
    elif endpoint is EMBEDDINGS:
        if not (isinstance(value, str) and value) and not (isinstance(value, list) and value):
            raise GatewayError(400, "'input' must be a non-empty string or array", "invalid_input")
    elif endpoint is COMPLETIONS:
        if not isinstance(value, (str, list)):
            raise GatewayError(400, "'prompt' must be a string or an array", "invalid_prompt")
    elif endpoint is MESSAGES:  # as Anthropic checks it: max_tokens is required there
        if not isinstance(value, list) or not value:
            raise GatewayError(400, "messages: must be a non-empty array", "invalid_messages")
        tokens = data.get("max_tokens")
        if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
            raise GatewayError(400, "max_tokens: a positive integer is required", "invalid_max_tokens")


def configured_model(endpoint: Endpoint, target: Target) -> str | None:
    """The model the provider config sets for this endpoint (replacing the client's), or None to
    keep the client's: `model` for chat (Anthropic's messages too), `embeddingModel` for
    embeddings, none for completions."""
    if endpoint is CHAT or endpoint is MESSAGES:
        return target.model
    if endpoint is EMBEDDINGS:
        return target.embedding_model
    return None


def configured_stream(endpoint: Endpoint, target: Target) -> bool | None:
    """The config's `stream` is a chat setting (Anthropic's messages too); other endpoints keep
    the client's."""
    return target.stream if endpoint is CHAT or endpoint is MESSAGES else None


def model_list(route: Route) -> bytes:
    """OpenAI's model list for a host: every model a request to it could be sent to (each rule's
    providers' chat and embedding models), in config order, each once."""
    seen: dict[str, str] = {}
    for rule in route.rules:
        for target in rule.targets:
            for model in (target.model, target.embedding_model):
                if model and model not in seen:
                    seen[model] = target.provider_host
    return orjson.dumps({"object": "list", "data": [
        {"id": model, "object": "model", "created": 0, "owned_by": owner} for model, owner in seen.items()]})
