"""The checked answer (`LLMDataPolicy` `responses.check`): the model's text in an answer checked
against the guard's answer rules (`Guard.answers`), masked, or withheld, as a prompt is.

Two forms, both driven by `extproc.dataplane.answer_exchange`:

- a JSON answer (whole, Envoy buffers it): every place it carries the model's text
  (`extproc.policy.data_protection.answers.answer_slots`) scanned at once; a block replaces the
  answer with the OpenAI-style error (400 `content_policy_violation`, naming policy, rule and
  detector), a mask rewrites the strings in place.
- server-sent events (chunk by chunk as Envoy streams them): each choice's content, reasoning,
  refusal and each tool call's arguments is a text of its own, followed across events by a
  `StreamScanner` that holds back only the last `hold` bytes (the longest span a pattern can
  examine), so a card number split over two events is still caught and the stream stays
  incremental. Each event goes on with the text released so far (masked); what is held comes out
  with the choice's finishing event, or before `[DONE]`. A block ends the stream: nothing of the
  event that held the value goes on, a chunk with `finish_reason: content_filter` for every
  choice, then an error event with the refusal, and nothing after it.

Counted by policy, rule, detector and action (`llm_gateway_data_policy_answer_*`), and told to
the access log as one `data_answer` entry (policy, rule, action, detectors); never what was found.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping
from typing import Any

import orjson
from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from .. import protobuf_wire as wire
from ..errors import GatewayError
from ..policy.answer_format import (
    CHECK_STREAM,
    EVENT_STREAM,
    EVENTS_TO_JSON,
    JSON,
    JSON_TO_EVENTS,
    AnswerPlan,
    check_mode,
)
from ..policy.caller import Caller
from ..policy.data_protection.answers import StreamKey, answer_slots, finished_choices, stream_slots
from ..policy.data_protection.policy import CONTENT_FILTER, Action, Guard, Hit, Verdict
from ..policy.data_protection.scanner import Found, StreamScanner
from ..policy.table import TableHolder
from ..protocol import METADATA_NAMESPACE
from . import answers
from .answer_converters import events_to_json, json_to_events
from .data_protection import ProtectionMetrics

log = logging.getLogger(__name__)

ANSWER_ENTRY = "data_answer"  # the access log's field: the deciding rule and action on the answer
# An event this long without its end is not one a provider streams: the stream ends with an error
# rather than holding (or passing unchecked) what comes.
MAX_EVENT_BYTES = 4 << 20
UNREADABLE_CODE = "data_policy_unreadable_answer"
_HEAD = ("id", "object", "created", "model", "system_fingerprint")  # copied into the chunks the check adds


class _Text:
    """One text of a stream (a choice's content, a tool call's arguments): its scanner, and the
    UTF-8 decoder that keeps a character the scanner's cut split for the next release."""

    __slots__ = ("scanner", "decoder")

    def __init__(self, guard: Guard):
        self.scanner = StreamScanner(guard.scanner, guard.masking)
        self.decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")

    def feed(self, text: str) -> tuple[str, list[Found]]:
        released = self.scanner.feed(text.encode("utf-8", "surrogatepass"))
        return self.decoder.decode(released.text), released.found

    def close(self) -> tuple[str, list[Found]]:
        released = self.scanner.close()
        return self.decoder.decode(released.text, True), released.found


class AnswerCheck:
    """One answer's check: `json` for a whole JSON answer, or `feed` for each chunk of a stream;
    `metadata` for the access log when the verdict changed; `finish` counts it, once."""

    __slots__ = ("guard", "_metrics", "_counts", "_texts", "_carry", "_searched", "_choices", "_head",
                 "_completion", "_block", "ended", "_told", "_counted")

    def __init__(self, guard: Guard, metrics: ProtectionMetrics):
        self.guard = guard
        self._metrics = metrics
        self._counts: dict[tuple[int, str], int] = {}  # (rule, detector) -> values found
        self._texts: dict[StreamKey, _Text] = {}
        self._carry = b""  # the start of an event whose end has not come
        self._searched = 0  # how much of the carry holds no event end
        self._choices: dict[Any, None] = {}  # the choices seen, in order
        self._head: dict[str, Any] = {}
        self._completion = False  # a text completion's stream (`text`, not `delta`)
        self._block = False  # a blocking rule's value was found
        self.ended = False  # a block (or an unreadable stream) ended it: the rest is dropped
        self._told: tuple[str, ...] = ()  # what the access log was last told
        self._counted = False

    # --- the verdict ---------------------------------------------------------------------------

    def _found(self, found: list[Found]) -> None:
        guard = self.guard
        patterns, owners, counts = guard.scanner.patterns, guard.owners, self._counts
        for f in found:
            if f.pattern in guard.blocking:
                self._block = True
            detector = patterns[f.pattern].detector
            for r in owners[f.pattern]:
                counts[(r, detector)] = counts.get((r, detector), 0) + 1

    def verdict(self) -> Verdict:
        return self.guard.verdict([Hit(r, d, n) for (r, d), n in self._counts.items()])

    def metadata(self) -> bytes:
        """The answer's `data_answer` entry for the access log, in wire form (dynamic metadata of
        a ProcessingResponse), when it changed since last told; else nothing."""
        if not self._counts:
            return b""
        verdict = self.verdict()
        assert verdict.rule is not None and verdict.action is not None
        detectors = ",".join(sorted({d for _, d in self._counts}))
        told = (verdict.rule.policy, verdict.rule.name, verdict.action.label, detectors)
        if told == self._told:
            return b""
        self._told = told
        fields = b"".join(wire.string_entry(key, value)
                          for key, value in zip(("policy", "rule", "action", "detectors"), told, strict=True))
        return wire.dynamic_metadata(METADATA_NAMESPACE, wire.struct_entry(ANSWER_ENTRY, wire.struct_value(fields)))

    def finish(self) -> None:
        """Counts the answer, once, however it ended (a client gone mid-stream too)."""
        if self._counted or not self._counts:
            return
        self._counted = True
        metrics, rules = self._metrics, self.guard.rules
        for (r, detector), n in self._counts.items():
            rule = rules[r]
            metrics.count(metrics.answer_found, rule.policy, rule.name, detector, rule.action.label, by=n)
        verdict = self.verdict()
        assert verdict.rule is not None and verdict.action is not None
        metrics.count(metrics.answers, verdict.rule.policy, verdict.rule.name, verdict.action.label)

    # --- a JSON answer -------------------------------------------------------------------------

    def json(self, body: bytes) -> bytes | GatewayError | None:
        """A whole JSON answer checked: the refusal that replaces it (a block), its body with the
        values masked, or None to pass it as it is (nothing found, only logged, not an answer)."""
        try:
            data = orjson.loads(body)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        slots = answer_slots(data)
        if not slots:
            return None
        texts = [slot.text.encode("utf-8", "surrogatepass") for slot in slots]
        guard = self.guard
        verdict = guard.inspect(texts)
        for found in verdict.found:
            self._found(found)
        if verdict.action is Action.BLOCK:
            return verdict.answer_refusal()
        if verdict.action is not Action.MASK:
            return None
        for slot, text in zip(slots, guard.masked_texts(texts, verdict), strict=True):
            if text is not None:
                slot.holder[slot.key] = text.decode("utf-8", "surrogatepass")
        return orjson.dumps(data)

    # --- a stream ------------------------------------------------------------------------------

    def feed(self, chunk: bytes, end: bool) -> bytes:
        """What of the stream goes on after this chunk (`end`: the answer's last)."""
        if self.ended:
            return b""
        data = self._carry + chunk if self._carry else chunk
        out: list[bytes] = []
        pos, search = 0, max(self._searched, 0)
        while True:  # each event's end: a blank line, "\n\n" or "\r\n\r\n" (two finds: a regex costs µs)
            lf, crlf = data.find(b"\n\n", search), data.find(b"\n\r\n", search)
            if lf < 0 and crlf < 0:
                break
            if crlf < 0 or 0 <= lf < crlf:
                out.append(self._event(data[pos:lf], b"\n\n"))
                pos = search = lf + 2
            else:
                start = crlf - 1 if data[crlf - 1:crlf] == b"\r" else crlf
                out.append(self._event(data[pos:start], data[start:crlf + 3]))
                pos = search = crlf + 3
            if self.ended:
                return b"".join(out)
        rest = data[pos:]
        if len(rest) > MAX_EVENT_BYTES:
            return b"".join(out) + self._unreadable()
        if end:
            if rest.strip():
                out.append(self._event(rest, b"\n\n"))
            self._carry = b""
            if not self.ended:
                out.append(self._flush(list(self._texts)))
        else:
            self._carry = rest
            self._searched = len(rest) - 3  # an end may start in the last bytes
        return b"".join(out)

    def _event(self, raw: bytes, end: bytes) -> bytes:
        """One event (without its blank line, `end`): as it came, or with its texts checked."""
        if raw.startswith(b"data: ") and b"\n" not in raw:  # one data line: what providers send
            payload, other = raw[6:].rstrip(b"\r"), b""
        else:
            lines = raw.split(b"\n")
            data = [line[5:].removeprefix(b" ").rstrip(b"\r") for line in lines if line.startswith(b"data:")]
            if not data:
                return raw + end
            payload = b"\n".join(data)
            other = b"".join(line + b"\n" for line in lines if not line.startswith(b"data:") and line.strip())
        if payload == b"[DONE]":
            held = self._flush(list(self._texts))
            return held if self.ended else held + raw + end
        try:
            event = orjson.loads(payload)
        except ValueError:  # not JSON: no choice's text in it
            return raw + end
        if not isinstance(event, dict) or not isinstance(event.get("choices"), list):
            return raw + end  # the usage event, an error event
        if not self._head:  # the chunks the check adds carry the stream's id and model
            self._head = {name: event[name] for name in _HEAD if name in event}
        for position, choice in enumerate(event["choices"]):
            if isinstance(choice, dict):
                index = choice.get("index", position)
                if index not in self._choices:
                    self._choices[index] = None
                    self._completion = self._completion or "text" in choice
        slots = stream_slots(event)
        texts = self._texts
        here: dict[StreamKey, Any] = {}
        for key, slot in slots:
            text = texts.get(key)
            if text is None:
                text = texts[key] = _Text(self.guard)
            released, found = text.feed(slot.text)
            slot.holder[slot.key] = released
            here[key] = slot
            if found:
                self._found(found)
        finished = finished_choices(event)
        if not slots and not finished:  # no text in it (the usage event): as it came
            return raw + end
        for index in finished:  # what its texts held goes out with it
            for key in [k for k in texts if k[0] == index]:
                tail, found = texts.pop(key).close()
                if found:
                    self._found(found)
                if tail:
                    _append(event, key, here.get(key), tail)
        if self._block:
            return self._blocked()
        return other + b"data: " + orjson.dumps(event) + b"\n\n"

    def _flush(self, keys: list[StreamKey]) -> bytes:
        """The held text of `keys` (the stream's end), as one chunk of its own."""
        choices: dict[Any, dict[str, Any]] = {}
        for key in keys:
            tail, found = self._texts.pop(key).close()
            if found:
                self._found(found)
            if not tail:
                continue
            empty: dict[str, Any] = {"text": ""} if key[1] == "text" else {"delta": {}}
            choice = choices.setdefault(key[0], {"index": key[0], **empty, "finish_reason": None})
            _append({"choices": [choice]}, key, None, tail)
        if self._block:
            return self._blocked()
        if not choices:
            return b""
        event = {**self._head, "choices": list(choices.values())}
        return b"data: " + orjson.dumps(event) + b"\n\n"

    def _blocked(self) -> bytes:
        """The end of a blocked stream: every choice finished by the filter, then the refusal."""
        self.ended = True
        self._texts.clear()
        refusal = self.verdict().answer_refusal()
        return self._ending(refusal)

    def _unreadable(self) -> bytes:
        self.ended = True
        self._texts.clear()
        self._carry = b""
        return self._ending(GatewayError(502, f"an event of the answer is longer than {MAX_EVENT_BYTES} bytes: it "
                                              "cannot be checked", UNREADABLE_CODE, "server_error"))

    def _ending(self, error: GatewayError) -> bytes:
        finish: dict[str, Any] = {"text": ""} if self._completion else {"delta": {}}
        choices = [{"index": index, **finish, "finish_reason": CONTENT_FILTER} for index in self._choices or (0,)]
        event = {**self._head, "choices": choices}
        return b"data: " + orjson.dumps(event) + b"\n\ndata: " + error.body() + b"\n\n"


def _append(event: dict[str, Any], key: StreamKey, slot: Any, tail: str) -> None:
    """`tail` (held text) added to `event` where the text `key` goes on: its slot in this event,
    else a new place in the choice's delta."""
    if slot is not None:
        slot.holder[slot.key] += tail
        return
    index = key[0]
    choice = next((c for c in event["choices"] if isinstance(c, dict) and c.get("index", 0) == index), None)
    if choice is None:
        return
    if key[1] == "text":
        choice["text"] = (choice.get("text") or "") + tail
        return
    delta = choice.get("delta")
    if not isinstance(delta, dict):
        delta = choice["delta"] = {}
    if key[1] == "tool_calls":
        calls = delta.get("tool_calls")
        if not isinstance(calls, list):
            calls = delta["tool_calls"] = []
        calls.append({"index": key[2], "function": {"arguments": tail}})
    elif key[1] == "function_call":
        delta["function_call"] = {"arguments": tail}
    else:
        delta[key[1]] = (delta.get(key[1]) or "") + tail


# --- the answer exchange's side: which answers are checked, and their messages ------------------

# A streamed answer checked piece by piece: Envoy sends its body in pieces (STREAMED), and its
# length, if the provider sent one, goes (the check changes it).
_STREAM_HEADERS = pb.ProcessingResponse()
_STREAM_HEADERS.response_headers.response.header_mutation.remove_headers.append("content-length")
_STREAM_HEADERS.mode_override.response_body_mode = ProcessingMode.STREAMED
STREAM_HEADERS = _STREAM_HEADERS.SerializeToString()
WHOLE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()  # the body, whole
UNCHANGED_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
FAILED = GatewayError(500, "the gateway failed to check the answer", "internal_error", "server_error")


class AnswerGuards:
    """Which answers are checked: the guard of the request's route for its caller's namespace
    (`ProtectionTable.guard`, as at the request; the answer filter's stream comes from the same
    Envoy, so its verified caller is the request's), and its rules that check answers."""

    def __init__(self, holder: TableHolder, metrics: ProtectionMetrics):
        self._holder = holder
        self.metrics = metrics

    def checked(self, fields: Mapping[str, struct_pb2.Value], caller: Caller, plan: AnswerPlan, status: int,
                content_type: str, kind: str | None) -> CheckedAnswer | None:
        """A marked answer's check, or None to pass it (the policy gone since the request, an
        error status, not a model's answer)."""
        mode = check_mode(plan.client_stream, status, content_type, kind)
        if mode is None:
            return None
        check = self._check(fields, caller)
        return None if check is None else CheckedAnswer(check, plan, kind, mode == CHECK_STREAM)

    def translated(self, fields: Mapping[str, struct_pb2.Value], caller: Caller, plan: AnswerPlan,
                   streamed: bool) -> CheckedAnswer | None:
        """The check of a model's answer translated from another API into OpenAI's (the exchange
        translates, then hands this check OpenAI's JSON or events), or None to pass it."""
        check = self._check(fields, caller)
        return None if check is None else CheckedAnswer(check, plan, None, streamed)

    def _check(self, fields: Mapping[str, struct_pb2.Value], caller: Caller) -> AnswerCheck | None:
        if "route" not in fields:
            return None
        guard = self._holder.table.protection.guard(fields["route"].string_value, caller.namespace)
        if guard is None or guard.answers is None:
            return None
        return AnswerCheck(guard.answers, self.metrics)


class CheckedAnswer:
    """A checked answer's messages: the answer to its headers, then to its body (whole: checked
    as the JSON the client reads, so converted first where the provider streamed and checked
    first where it answered JSON; or piece by piece)."""

    __slots__ = ("check", "_plan", "_kind", "streamed")

    def __init__(self, check: AnswerCheck, plan: AnswerPlan, kind: str | None, streamed: bool):
        self.check = check
        self._plan = plan
        self._kind = kind
        self.streamed = streamed

    def headers(self) -> bytes:
        return STREAM_HEADERS if self.streamed else WHOLE_HEADERS

    def body(self, body: pb.HttpBody) -> tuple[list[bytes], bool]:
        check = self.check
        if self.streamed:
            out = check.feed(body.body, body.end_of_stream)
            response = wire.response_body_replaced(out) + check.metadata()
        else:
            response = self._whole(body.body) + check.metadata()
        done = body.end_of_stream or not self.streamed
        if done:
            check.finish()
        return [response], done

    def _whole(self, raw: bytes) -> bytes:
        check, plan, kind = self.check, self._plan, self._kind
        if kind == EVENTS_TO_JSON:  # the client reads one JSON answer: converted, then checked
            converted = events_to_json(raw, plan)
            if converted is None:  # events the converter cannot read: checked as the stream they are
                return _replaced(check.feed(raw, True), EVENT_STREAM, None)
            if converted.status is not None:  # an error event, reported as a JSON error
                return _replaced(converted.body, converted.content_type, converted.status)
            result = check.json(converted.body)
            if isinstance(result, GatewayError):
                return _replaced(result.body(), JSON, result.status)
            return _replaced(result if result is not None else converted.body, JSON, None)
        result = check.json(raw)
        if isinstance(result, GatewayError):  # withheld: the error, as any error answer (JSON)
            return _replaced(result.body(), JSON, result.status)
        if kind == JSON_TO_EVENTS:  # the client reads events: checked, then converted
            text = result if result is not None else raw
            events = json_to_events(text, plan)
            if events is None:
                return _replaced(text, JSON, None) if result is not None else UNCHANGED_BODY
            return _replaced(events.body, events.content_type, None)
        return UNCHANGED_BODY if result is None else _replaced(result, JSON, None)

    def failed(self, phase: str | None, last: bool) -> tuple[list[bytes], bool]:
        """A bug while checking: never the answer unchecked, never a stack trace. Before its
        body is sent on, the client gets a 500; a stream under way ends with the error event."""
        log.exception("checking an answer failed on %s", phase)
        if phase == "response_headers" or not self.streamed:
            return [answers.immediate(FAILED).SerializeToString()], True
        if self.check.ended:
            return [wire.response_body_replaced(b"")], last
        self.check.ended = True
        return [wire.response_body_replaced(b"data: " + FAILED.body() + b"\n\n")], last


def _replaced(body: bytes, content_type: str, status: int | None) -> bytes:
    """A body answer replacing a whole answer's body, with its content type, length and status."""
    response = pb.ProcessingResponse()
    common = response.response_body.response
    mutation = common.header_mutation
    mutation.set_headers.extend([answers.header("content-type", content_type),
                                 answers.header("content-length", str(len(body)))])
    if status is not None:
        mutation.set_headers.append(answers.header(":status", str(status)))
    common.body_mutation.body = body
    return response.SerializeToString()
