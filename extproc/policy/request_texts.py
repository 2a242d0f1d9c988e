"""The texts of a request, whatever the client's API: what a model is asked, as a list of strings.

One function for every client API the gateway accepts (OpenAI's chat, completions and
embeddings; Anthropic's Messages API), so that whatever reads prompts (data protection's
detectors, a future content policy) reads them the same way from every API, translated or not
(docs/translation.md). Pure; images, audio and token arrays are not text and are left out.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from .openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, Endpoint


def texts_of_request(endpoint: Endpoint, body: Mapping[str, object]) -> list[str]:
    """Every text of the request's body for `endpoint`, in the order a model reads them: the system
    prompt, then each message's text (its text parts, tool results, tool calls' arguments); a
    completion's prompt; an embedding's input."""
    if endpoint is CHAT:
        return [text for message in _items(body.get("messages")) for text in _chat_message(message)]
    if endpoint is MESSAGES:
        texts = _texts(body.get("system"))
        for message in _items(body.get("messages")):
            texts.extend(_texts(message.get("content")))
        return texts
    if endpoint is COMPLETIONS:
        return _strings(body.get("prompt"))
    if endpoint is EMBEDDINGS:
        return _strings(body.get("input"))
    return []


def _items(value: object) -> list[Mapping[str, object]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []


def _strings(value: object) -> list[str]:
    if isinstance(value, str):
        return [value]
    return [item for item in value if isinstance(item, str)] if isinstance(value, list) else []


def _chat_message(message: Mapping[str, object]) -> list[str]:
    texts = _texts(message.get("content"))
    for call in _items(message.get("tool_calls")):
        function = call.get("function")
        if isinstance(function, Mapping) and isinstance(function.get("arguments"), str):
            texts.append(function["arguments"])
    return texts


def _texts(content: object) -> list[str]:
    """A content's texts: a string; or its blocks' text (OpenAI's text parts, Anthropic's text
    blocks, tool results and tool uses' input)."""
    if isinstance(content, str):
        return [content] if content else []
    texts: list[str] = []
    for block in _items(content):
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(str(block["text"]))
        elif kind == "tool_result":
            texts.extend(_texts(block.get("content")))
        elif kind == "tool_use" and isinstance(block.get("input"), Mapping):
            texts.append(json.dumps(block["input"], ensure_ascii=False))
    return texts
