"""A chat request in the client's API turned into the request of the provider's API (the pairs
of `extproc.translation`): through OpenAI's chat request where neither side speaks it."""

from __future__ import annotations

from ..policy.provider_api import ANTHROPIC, BEDROCK, GEMINI
from ..policy.table import ApiSettings, Target
from . import anthropic, bedrock, gemini
from .parts import Json

_DEFAULT = ApiSettings()


def translate_request(client_api: str, target: Target, data: Json, model: str, stream: bool) -> Json:
    """The request body for `target`'s API, from the client's (checked for its endpoint): its
    model, its stream, the rest translated (a GatewayError 400 for what the provider's API cannot
    carry). An Anthropic client's request to an Anthropic provider changes only its model."""
    provider_api = target.body_api
    if client_api == ANTHROPIC:
        if provider_api == ANTHROPIC:
            return {**data, "model": model}
        data = anthropic.to_openai_request(data, stream)
    if provider_api == ANTHROPIC:
        return anthropic.to_anthropic_request(data, model, target.api_settings or _DEFAULT, stream)
    if provider_api == GEMINI:
        return gemini.to_gemini_request(data)
    if provider_api == BEDROCK:
        return bedrock.to_converse_request(data)
    return {**data, "model": model}  # an Anthropic client's request, for an OpenAI provider
