"""Every place a request's body carries prompt text, per endpoint: OpenAI's, and Anthropic's
Messages API (its `system`, text blocks, tool results and tool uses' input), the one reader of
prompts for every client API.

A policy that checked only `messages[i].content` strings would let the same text through as a
content-part array, a tool call's arguments or an embeddings input. Each place is a `Slot`: the
JSON object or array holding the string, and its key there, so a masked text is written back in
place. Token arrays (completions' and embeddings' lists of integers) carry no text to check.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from ..openai_api import CHAT, COMPLETIONS, EMBEDDINGS, MESSAGES, Endpoint


class Slot(NamedTuple):
    holder: Any  # the dict or list holding the text
    key: Any  # its key (str) or index (int) there
    path: str  # where it is, for `extproc route`: "messages[1].content[0].text"

    @property
    def text(self) -> str:
        value: str = self.holder[self.key]
        return value


def prompt_slots(endpoint: Endpoint, data: dict[str, Any]) -> list[Slot]:
    """The strings of a request body (already checked for its endpoint) that hold prompt text."""
    slots: list[Slot] = []
    if endpoint is CHAT:
        messages = data.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    _message(message, f"messages[{i}]", slots)
    elif endpoint is MESSAGES:
        _blocks(data, "system", "system", slots)
        messages = data.get("messages")
        if isinstance(messages, list):
            for i, message in enumerate(messages):
                if isinstance(message, dict):
                    _blocks(message, "content", f"messages[{i}].content", slots)
    elif endpoint is COMPLETIONS:
        _strings(data, "prompt", "prompt", slots)
    elif endpoint is EMBEDDINGS:
        _strings(data, "input", "input", slots)
    return slots


def _message(message: dict[str, Any], path: str, slots: list[Slot]) -> None:
    content = message.get("content")
    if isinstance(content, str):
        slots.append(Slot(message, "content", f"{path}.content"))
    elif isinstance(content, list):  # content parts: {"type": "text", "text": ...}, images, ...
        for j, part in enumerate(content):
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                slots.append(Slot(part, "text", f"{path}.content[{j}].text"))
            elif isinstance(part, str):
                slots.append(Slot(content, j, f"{path}.content[{j}]"))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                slots.append(Slot(function, "arguments", f"{path}.tool_calls[{k}].function.arguments"))
    legacy = message.get("function_call")  # the deprecated single call
    if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
        slots.append(Slot(legacy, "arguments", f"{path}.function_call.arguments"))


def _strings(data: dict[str, Any], key: str, path: str, slots: list[Slot]) -> None:
    """A string, or an array of strings (an array of token arrays holds no text)."""
    value = data.get(key)
    if isinstance(value, str):
        slots.append(Slot(data, key, path))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                slots.append(Slot(value, i, f"{path}[{i}]"))


def _blocks(holder: dict[str, Any], key: str, path: str, slots: list[Slot]) -> None:
    """An Anthropic content: a string, or blocks: text, a tool result's content (a string or
    blocks), a tool use's input (every string in it); images and documents carry no text."""
    content = holder.get(key)
    if isinstance(content, str):
        slots.append(Slot(holder, key, path))
        return
    if not isinstance(content, list):
        return
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind == "text" and isinstance(block.get("text"), str):
            slots.append(Slot(block, "text", f"{path}[{j}].text"))
        elif kind == "tool_result":
            _blocks(block, "content", f"{path}[{j}].content", slots)
        elif kind == "tool_use":
            _nested(block.get("input"), f"{path}[{j}].input", slots)


def _nested(value: Any, path: str, slots: list[Slot]) -> None:
    """Every string in a JSON value (a tool use's input), each a slot of its own."""
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(item, str):
                slots.append(Slot(value, key, f"{path}.{key}"))
            else:
                _nested(item, f"{path}.{key}", slots)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if isinstance(item, str):
                slots.append(Slot(value, i, f"{path}[{i}]"))
            else:
                _nested(item, f"{path}[{i}]", slots)
