"""Prompt and completion contents in spans, where an operator turned them on
(`OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT=true`, the variable OpenTelemetry's GenAI
instrumentations read; off by default): as the GenAI semantic conventions' opt-in
`gen_ai.input.messages` and `gen_ai.output.messages`, never raw (docs/tracing.md, "Contents").

The prompt is taken by the ext_proc from the body it sends (after any data policy masked it),
only for a sampled request, masked for traces (`extproc.policy.data_protection.trace_masking`)
and bounded, and travels as the request's `prompt_sample` metadata to its access-log entry. The
answer's first bytes come from Envoy's answer reader (`extproc.envoy.answer_reader`); the
receiver takes the text out of them (a JSON answer's message, a stream's deltas) and masks it
the same way before the span is built. Raw text never reaches a span, a log or a metric.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import orjson
from envoy.data.accesslog.v3 import accesslog_pb2

from .. import protobuf_wire as wire
from ..policy.data_protection.policy import Guard
from ..policy.data_protection.prompts import prompt_slots
from ..policy.data_protection.trace_masking import mask_for_trace, masked_with
from ..policy.openai_api import Endpoint
from ..policy.table import RoutingTable
from ..protocol import ANSWER_SAMPLE_KEY, FINISH_REASON_KEY, METADATA_NAMESPACE
from ..telemetry.metrics import RequestRecord

log = logging.getLogger(__name__)

CAPTURE_VARIABLE = "OTEL_INSTRUMENTATION_GENAI_CAPTURE_MESSAGE_CONTENT"
PROMPT_KEY = "prompt_sample"  # metadata (namespace `llm_gateway`): the masked input messages, as JSON
MAX_PROMPT = 8192  # characters of the input messages' JSON a span carries at most


def capture_contents(environ: Mapping[str, str] | None = None) -> bool:
    """Whether spans carry prompt and completion contents (masked): off unless the variable is true."""
    env = os.environ if environ is None else environ
    return env.get(CAPTURE_VARIABLE, "").strip().lower() == "true"


class TraceContents:
    """The contents of a sampled request's span, masked with the guards of the config in force."""

    def __init__(self, table: Callable[[], RoutingTable]):
        self._table = table

    def _guard(self, route: str) -> Guard | None:
        """Every data policy that applies to the route (whatever the caller's namespace)."""
        return self._table().protection.guard(route, None)

    def prompt_entry(self, body: bytes, endpoint: Endpoint, route: str) -> bytes:
        """The masked input messages of the body sent, as a metadata entry (empty for none, or
        where they cannot be read: a span's contents never fail a request)."""
        try:
            messages = input_messages(orjson.loads(body), endpoint, self._guard(route))
        except Exception:
            log.exception("cannot take the prompt for a span")
            return b""
        if not messages:
            return b""
        text = orjson.dumps(messages).decode()
        if len(text) > MAX_PROMPT:  # the last messages matter most: the first ones are dropped
            while len(messages) > 1 and len(orjson.dumps(messages)) > MAX_PROMPT:
                messages.pop(0)
            text = orjson.dumps(messages).decode()[:MAX_PROMPT]
        return wire.string_entry(PROMPT_KEY, text)

    def attributes(self, entry: accesslog_pb2.HTTPAccessLogEntry, record: RequestRecord) -> dict[str, str]:
        """The span's contents: the input messages as the ext_proc masked them, the answer's
        text masked here, and which detectors masked them."""
        meta = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
        fields = meta.fields if meta is not None else {}
        out: dict[str, str] = {}
        prompt = fields.get(PROMPT_KEY)
        if prompt is not None:
            out["gen_ai.input.messages"] = prompt.string_value
        sample = fields.get(ANSWER_SAMPLE_KEY)
        guard = self._guard(record.route)
        if sample is not None:
            finish = fields.get(FINISH_REASON_KEY)
            text = answer_text(sample.string_value, record.stream)
            message: dict[str, Any] = {"role": "assistant",
                                       "parts": [{"type": "text", "content": mask_for_trace(text, guard)}]}
            if finish is not None:
                message["finish_reason"] = finish.string_value
            out["gen_ai.output.messages"] = orjson.dumps([message]).decode()
        if out:
            out["llm_gateway.contents.masked_with"] = masked_with(guard)
        return out


def input_messages(data: Any, endpoint: Endpoint, guard: Guard | None) -> list[dict[str, Any]]:
    """The prompt's texts (every place `prompt_slots` finds one: contents, content parts, tool
    calls' arguments) as GenAI input messages, each text masked for traces."""
    if not isinstance(data, dict):
        return []
    messages: list[dict[str, Any]] = []
    by_message: dict[str, dict[str, Any]] = {}
    for slot in prompt_slots(endpoint, data):
        where = slot.path.split(".", 1)[0].split("[", 1)
        role = "user"
        if where[0] == "messages" and len(where) > 1:
            index = int(where[1].rstrip("]"))
            source = data["messages"][index]
            role = str(source.get("role", "user")) if isinstance(source, dict) else "user"
        key = slot.path.split(".", 1)[0]
        message = by_message.get(key)
        if message is None:
            message = by_message[key] = {"role": role, "parts": []}
            messages.append(message)
        kind = "tool_call" if "arguments" in slot.path else "text"
        part: dict[str, Any] = {"type": kind, ("arguments" if kind == "tool_call" else "content"):
                                mask_for_trace(slot.text, guard)}
        message["parts"].append(part)
    return messages


def answer_text(sample: str, stream: bool) -> str:
    """The generated text in an answer's first bytes: a JSON answer's first message (content and
    tool calls' arguments), or a stream's content deltas from its whole events. A JSON answer
    longer than the sample is not parsed: that is said instead."""
    if not stream or not sample.lstrip().startswith("data:"):
        try:
            data = orjson.loads(sample)
        except orjson.JSONDecodeError:
            return "[the answer is longer than what the gateway keeps for traces]"
        choice = (data.get("choices") or [{}])[0] if isinstance(data, dict) else {}
        message = choice.get("message") or {} if isinstance(choice, dict) else {}
        text = message.get("content") or choice.get("text") or ""
        calls = [c.get("function", {}).get("arguments", "") for c in message.get("tool_calls") or []
                 if isinstance(c, dict)]
        return "\n".join([str(text), *map(str, calls)]).strip() if calls else str(text)
    parts = []
    for line in sample.splitlines():
        if not line.startswith("data:"):
            continue
        payload = line[5:].strip()
        if payload == "[DONE]":
            break
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            break  # cut: the sample ends here
        choices = event.get("choices") if isinstance(event, dict) else None
        if choices and isinstance(choices[0], dict):
            delta = choices[0].get("delta") or {}
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(choices[0].get("text"), str):
                parts.append(choices[0]["text"])
    return "".join(parts)
