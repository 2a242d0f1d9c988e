"""Every place an answer carries text a model wrote: a whole JSON answer's, and a streamed
answer's pieces, for chat and for the legacy text completions (embeddings carry no text).

A check that looked only at `message.content` would let the same text out as a refusal, a
reasoning text or a tool call's arguments. A JSON answer's places are `Slot`s, as a prompt's
are (written back in place when masked). A stream's pieces are keyed by what they continue: a
choice's content, reasoning or refusal, or one of its tool calls' arguments, each a text of its
own that a stream scanner follows across events (`extproc.dataplane.answer_check`).
"""

from __future__ import annotations

from typing import Any

from .prompts import Slot

# The text fields of a chat message (or of a streamed delta) that a model writes in pieces.
MESSAGE_TEXTS = ("content", "reasoning_content", "refusal")

# What a streamed piece continues: (choice index, field) or (choice index, "tool_calls", call index)
StreamKey = tuple[Any, ...]


def answer_slots(data: dict[str, Any]) -> list[Slot]:
    """The strings of a JSON chat or completions answer that hold the model's text."""
    slots: list[Slot] = []
    choices = data.get("choices")
    if not isinstance(choices, list):
        return slots
    for i, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        if isinstance(choice.get("text"), str):  # a text completion
            slots.append(Slot(choice, "text", f"choices[{i}].text"))
        message = choice.get("message")
        if isinstance(message, dict):
            _message(message, f"choices[{i}].message", slots)
    return slots


def _message(message: dict[str, Any], path: str, slots: list[Slot]) -> None:
    for key in MESSAGE_TEXTS:
        value = message.get(key)
        if isinstance(value, str):
            slots.append(Slot(message, key, f"{path}.{key}"))
        elif key == "content" and isinstance(value, list):  # content parts, as some providers answer
            for j, part in enumerate(value):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    slots.append(Slot(part, "text", f"{path}.content[{j}].text"))
    calls = message.get("tool_calls")
    if isinstance(calls, list):
        for k, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                slots.append(Slot(function, "arguments", f"{path}.tool_calls[{k}].function.arguments"))
    legacy = message.get("function_call")
    if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
        slots.append(Slot(legacy, "arguments", f"{path}.function_call.arguments"))


def stream_slots(event: dict[str, Any]) -> list[tuple[StreamKey, Slot]]:
    """The pieces of text one streamed event carries, each with the text it continues."""
    out: list[tuple[StreamKey, Slot]] = []
    choices = event.get("choices")
    if not isinstance(choices, list):
        return out
    for position, choice in enumerate(choices):
        if not isinstance(choice, dict):
            continue
        index = choice.get("index", position)
        if isinstance(choice.get("text"), str):  # a text completion's stream
            out.append(((index, "text"), Slot(choice, "text", "text")))
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            continue
        for key in MESSAGE_TEXTS:
            if isinstance(delta.get(key), str):
                out.append(((index, key), Slot(delta, key, key)))
        calls = delta.get("tool_calls")
        if isinstance(calls, list):
            for k, call in enumerate(calls):
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    out.append(((index, "tool_calls", call.get("index", k)), Slot(function, "arguments", "arguments")))
        legacy = delta.get("function_call")
        if isinstance(legacy, dict) and isinstance(legacy.get("arguments"), str):
            out.append(((index, "function_call"), Slot(legacy, "arguments", "arguments")))
    return out


def finished_choices(event: dict[str, Any]) -> list[Any]:
    """The indexes of the choices this event finishes (a `finish_reason` set)."""
    choices = event.get("choices")
    if not isinstance(choices, list):
        return []
    return [choice.get("index", position) for position, choice in enumerate(choices)
            if isinstance(choice, dict) and choice.get("finish_reason") is not None]
