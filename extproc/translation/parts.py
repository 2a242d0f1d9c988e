"""Pieces every request translation reads an OpenAI chat request with: its messages checked, the
text of a content, an image part's data or URL, a tool call's arguments, and the 400 a request
gets for what the provider's API has no place for."""

from __future__ import annotations

from typing import Any

import orjson

from ..errors import GatewayError

Json = dict[str, Any]


def unsupported(what: str, api: str) -> GatewayError:
    """A 400 for a part of the request that the provider's API cannot carry (never dropped
    silently where it changes what the model is asked)."""
    return GatewayError(400, f"{what}: not supported by {api}, the API of the provider this request was routed to",
                        "unsupported_content")


def invalid(what: str, code: str = "invalid_messages") -> GatewayError:
    return GatewayError(400, what, code)


def messages_of(data: Json, field: str = "messages") -> list[Json]:
    """The request's messages, each an object with a string role."""
    messages = data.get(field)
    if not isinstance(messages, list):
        raise invalid(f"'{field}' must be an array")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise invalid(f"{field}[{i}] must be an object with a 'role'")
    return messages


def text_of(content: object, where: str) -> str:
    """A content that may only hold text (a system message, a tool result): a string, or an
    array of text parts, joined."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            else:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise invalid(f"{where}: only text parts are allowed here (got {kind!r})")
        return "\n".join(texts)
    raise invalid(f"{where}: content must be a string or an array of parts")


def content_parts(content: object, where: str) -> list[Json]:
    """A user or assistant message's content as an array of parts (a string is one text part)."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(part, dict) for part in content):
        return content
    raise invalid(f"{where}: content must be a string or an array of parts")


def image_url(part: Json, where: str) -> tuple[str | None, str]:
    """An `image_url` part: (media type, base64 data) for a `data:` URL, (None, URL) otherwise."""
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise invalid(f"{where}: image_url.url must be a string")
    if url.startswith("data:"):
        head, sep, data = url[5:].partition(",")
        media, _, encoding = head.partition(";")
        if not sep or encoding != "base64" or not media:
            raise invalid(f"{where}: an image data URL must be data:<media type>;base64,<data>")
        return media, data
    return None, url


def arguments(call: Json, where: str) -> Any:
    """A tool call's arguments (a JSON text in OpenAI's shape) as the object they stand for."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise invalid(f"{where}: a tool call needs function.name")
    text = function.get("arguments") or "{}"
    try:
        value = orjson.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise invalid(f"{where}: function.arguments is not valid JSON") from None
    if not isinstance(value, dict):
        raise invalid(f"{where}: function.arguments must be a JSON object")
    return value


def functions(data: Json, api: str) -> list[Json]:
    """The request's tools, each OpenAI's function tool (`{"type": "function", "function": ...}`)."""
    tools = data.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise invalid("'tools' must be an array", "invalid_tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict) or not isinstance(tool.get("function"), dict) \
                or not isinstance(tool["function"].get("name"), str):
            raise invalid(f"tools[{i}] must be a function tool with function.name", "invalid_tools")
        if tool.get("type", "function") != "function":
            raise unsupported(f"tools[{i}] of type {tool.get('type')!r}", api)
        out.append(tool["function"])
    return out


def stop_sequences(data: Json) -> list[str] | None:
    """`stop` (a string or an array of strings) as a list."""
    stop = data.get("stop")
    if stop is None:
        return None
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        return list(stop)
    raise invalid("'stop' must be a string or an array of strings", "invalid_stop")


def max_tokens(data: Json) -> int | None:
    """`max_completion_tokens`, else the older `max_tokens`."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = data.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise invalid(f"'{key}' must be a positive integer", "invalid_max_tokens")
            return value
    return None


def one_choice(data: Json, api: str) -> None:
    n = data.get("n")
    if n is not None and n != 1:
        raise unsupported("n other than 1 (several choices)", api)
