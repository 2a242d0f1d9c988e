"""The answer's exchange: a request's answer, back through the gateway, turned into the format
its client asked for (docs/api.md, "Streamed or not").

Only requests the request's exchange marked come here (`extproc.policy.answer_format.answer_plan`:
a provider they may reach answers in another format than the client asked for), on a gRPC stream
of their own opened by Envoy's answer filter (`extproc.envoy.answer_filter`) when the answer's
headers arrive:

1. the answer's headers, with the request's decision as metadata (what the client asked for):
   `conversion()` says whether this answer needs converting (its status, its content type). If
   not (an error, or already in the client's format: a failover attempt to a provider that kept
   the client's `stream`), Envoy is told to send no body (`mode_override`) and the stream ends;
2. else the whole body, which one of `CONVERTERS` turns into the client's format; the answer
   goes back with its new content type and length, and the stream ends.

Across APIs (docs/translation.md: a client or provider of another API than OpenAI's) the
answer is translated by `extproc.translation.answers`: whole (JSON, an error, a stream the client
wants as one answer), or a stream the client wants as a stream piece by piece, as it comes: Envoy
is told to send the body in pieces (`mode_override`, STREAMED) and each piece goes back with the
client's events it completes, so the client reads each event as soon as the provider sent it.
Either way the answer's usage, model and error type go into the request's metadata, where the
access log, the metrics and the budgets read them (Envoy's own readers know OpenAI's shapes only).

An answer a data policy checks (`responses.check`, marked `check_answer` in the decision) is
handed to `extproc.dataplane.answer_check` at its headers: read whole (JSON, or converted), or
piece by piece where the client reads the provider's stream as a stream (Envoy is told to send
the body in pieces, `mode_override` STREAMED), so that it stays incremental. A provider of another
API: its answer is translated into OpenAI's first, then checked as OpenAI's, piece by piece or
whole (clients of another API are refused at the request where a policy checks answers:
`extproc.policy.answer_format.answer_plan`).

The stream is open from the answer's headers to its last byte: for a provider's stream turned
into one JSON answer, as long as the provider streams. Each open one counts as an ext_proc stream
(`Inflight.streams`), which a graceful drain waits for.
"""

from __future__ import annotations

import logging

from envoy.extensions.filters.http.ext_proc.v3.processing_mode_pb2 import ProcessingMode
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..errors import GatewayError
from ..policy.answer_format import (
    EVENT_STREAM,
    JSON,
    OBSERVE_WHOLE,
    STREAMED,
    TRANSLATE_STREAM,
    AnswerPlan,
    conversion,
)
from ..policy.body_memory import Inflight
from ..policy.caller import LOCAL, Caller
from ..policy.table import OPENAI_API
from ..protocol import METADATA_NAMESPACE
from ..translation.answers import StreamTranslator, observe_whole, translate_whole
from ..translation.openai_chunks import INCOMPLETE_CODE
from . import answers
from .answer_check import FAILED, AnswerGuards, CheckedAnswer
from .answer_converters import CONVERTERS, Converter

log = logging.getLogger(__name__)

# An answer that changes nothing and asks for no body: the rest of the answer passes Envoy as it is.
_PASS = pb.ProcessingResponse()
_PASS.response_headers.SetInParent()
_PASS.mode_override.SetInParent()  # every mode back to its default: no body, no trailers
PASS = _PASS.SerializeToString()
UNCHANGED_BODY = pb.ProcessingResponse(response_body=pb.BodyResponse()).SerializeToString()
CONTINUE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse()).SerializeToString()


class AnswerProcessor:
    """The answer filter's ext_proc service: one `AnswerExchange` per answer. `guards`: which
    answers data policies check (None: none are)."""

    def __init__(self, inflight: Inflight | None = None, guards: AnswerGuards | None = None):
        self.inflight = inflight or Inflight()
        self.guards = guards

    def exchange(self, caller: Caller | None = LOCAL) -> AnswerExchange:
        return AnswerExchange(self.inflight, self.guards, caller or LOCAL)


class AnswerExchange:
    __slots__ = ("_inflight", "_plan", "_converter", "_open", "_whole", "_stream", "_provider_api", "_model",
                 "_answer_id", "_error_kind", "_status_and_type", "_error_reported", "_guards", "_caller", "_checked",
                 "_translated_check")

    def __init__(self, inflight: Inflight, guards: AnswerGuards | None = None, caller: Caller = LOCAL):
        self._inflight = inflight
        inflight.streams += 1
        self._open = True
        self._plan: AnswerPlan | None = None
        self._converter: Converter | None = None  # the answer converted whole, in one format of OpenAI's API
        self._whole = ""  # ... or across APIs, whole: TRANSLATE_WHOLE or OBSERVE_WHOLE
        self._stream: StreamTranslator | None = None  # ... or piece by piece, as it comes
        self._provider_api = OPENAI_API
        self._model = ""  # the request's model (an answer that names none: Bedrock's)
        self._answer_id = ""
        self._error_kind = ""  # Bedrock's error type, from its header
        self._status_and_type = (0, "")  # the answer's, for a whole translation
        self._error_reported = False  # a stream's error event is in the request's metadata
        self._guards = guards
        self._caller = caller  # the Envoy the answer comes through: the request's caller
        self._checked: CheckedAnswer | None = None  # a data policy checks this answer (OpenAI's on both sides)
        self._translated_check: CheckedAnswer | None = None  # ... translated into OpenAI's, then checked

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        request = pb.ProcessingRequest.FromString(message)
        phase = request.WhichOneof("request")
        try:
            if phase == "response_headers":
                answer = self._on_headers(request)
                return [answer], (self._converter is None and not self._whole and self._stream is None
                                  and self._checked is None)
            if phase == "response_body":
                body = request.response_body
                if self._checked is not None:
                    return self._checked.body(body)
                if self._stream is not None:
                    return [self._on_piece(body.body, body.end_of_stream)], body.end_of_stream
                if self._converter is not None and self._plan is not None:
                    return [self._on_body(body.body)], True
                if self._whole and self._plan is not None:
                    return [self._on_whole(body.body)], True
        except Exception:  # a bug: the answer passes as the provider sent it, never a stack trace
            checked = self._checked or self._translated_check
            if checked is not None:  # ... but a checked one: never unchecked
                return checked.failed(phase, phase == "response_body" and request.response_body.end_of_stream)
            log.exception("answer exchange failed on %s", phase)
            self._converter, self._whole = None, ""
            if phase == "response_body" and self._stream is not None:
                self._stream = None
                return [UNCHANGED_BODY], True
            self._stream = None
            return [PASS if phase == "response_headers" else UNCHANGED_BODY], True
        return [answers.continue_phase(phase).SerializeToString()], phase == "response_body"

    def _on_headers(self, request: pb.ProcessingRequest) -> bytes:
        decision = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        fields = decision.fields if decision is not None else {}
        if answers.CLIENT_STREAM not in fields:  # not a marked request (cannot happen with our config)
            return PASS
        client_api = fields[answers.CLIENT_API].string_value if answers.CLIENT_API in fields else OPENAI_API
        self._plan = plan = AnswerPlan(fields[answers.CLIENT_STREAM].bool_value,
                                       answers.INCLUDE_USAGE in fields and fields[answers.INCLUDE_USAGE].bool_value,
                                       client_api)
        provider_api = self._provider_api = (fields[answers.PROVIDER_API].string_value
                                             if answers.PROVIDER_API in fields else OPENAI_API)
        self._model = fields["request_model"].string_value if "request_model" in fields else ""
        status, content_type = 0, ""
        for h in request.response_headers.headers.headers:
            if h.key == ":status":
                status = int(h.raw_value or b"0")
            elif h.key == "content-type":
                content_type = h.raw_value.decode("latin-1")
            elif h.key == "x-amzn-requestid":
                self._answer_id = h.raw_value.decode("latin-1")
            elif h.key == "x-amzn-errortype":
                self._error_kind = h.raw_value.decode("latin-1")
        self._status_and_type = (status, content_type)
        kind = conversion(plan.client_stream, status, content_type, client_api, provider_api)
        if (self._guards is not None and answers.CHECK_ANSWER in fields
                and not request.response_headers.end_of_stream):  # a data policy checks it
            if client_api == OPENAI_API and provider_api == OPENAI_API:
                self._checked = self._guards.checked(fields, self._caller, plan, status, content_type, kind)
                if self._checked is not None:
                    return self._checked.headers()
            elif 200 <= status < 300:  # translated into OpenAI's API first, then checked
                self._translated_check = self._guards.translated(fields, self._caller, plan, kind in STREAMED)
        if kind is None or request.response_headers.end_of_stream:  # nothing to convert, or no body to do it on
            return PASS
        if kind in STREAMED:  # piece by piece, as the provider sends it
            self._stream = StreamTranslator(client_api, provider_api, plan.include_usage, self._model,
                                            self._answer_id)
            response = pb.ProcessingResponse()
            mutation = response.response_headers.response.header_mutation
            if kind == TRANSLATE_STREAM:
                mutation.set_headers.append(answers.header("content-type", EVENT_STREAM))
            mutation.remove_headers.append("content-length")
            response.mode_override.response_body_mode = ProcessingMode.STREAMED
            return response.SerializeToString()
        if kind in CONVERTERS:
            self._converter = CONVERTERS[kind]
        else:
            self._whole = kind
        return CONTINUE_HEADERS  # the body comes next, whole

    def _on_body(self, body: bytes) -> bytes:
        assert self._converter is not None and self._plan is not None
        converted = self._converter(body, self._plan)
        if converted is None:  # not an answer the converter can read: the client gets it as it came
            log.warning("an answer could not be converted to the client's format: passed on as the provider sent it")
            return UNCHANGED_BODY
        return _replaced(converted.body, converted.content_type, converted.status)

    def _on_whole(self, body: bytes) -> bytes:
        """A whole answer across APIs: translated (or its usage read), its usage into the metadata."""
        plan = self._plan
        assert plan is not None
        if self._whole == OBSERVE_WHOLE:
            counted, model = observe_whole(self._provider_api, body)
            response = pb.ProcessingResponse(response_body=pb.BodyResponse())
            _usage_metadata(response, counted, model, None)
            return response.SerializeToString()
        status, content_type = self._status_and_type
        translated = translate_whole(plan.client_api, self._provider_api, plan.client_stream, plan.include_usage,
                                     status, content_type, body, self._model, self._answer_id, self._error_kind)
        checked = self._translated_check
        if translated is None:
            if checked is not None:  # a checked answer never goes unchecked: the client gets an error
                log.warning("a checked answer could not be translated to the client's API: withheld")
                return _replaced(FAILED.body(), JSON, FAILED.status)
            log.warning("an answer could not be translated to the client's API: passed on as the provider sent it")
            return UNCHANGED_BODY
        sent, sent_type, new_status = translated.body, translated.content_type, translated.status
        if checked is not None and new_status is None:  # a model's answer, in OpenAI's shape: checked
            check = checked.check
            if sent_type == EVENT_STREAM:
                sent = check.feed(sent, True)
            else:
                result = check.json(sent)
                if isinstance(result, GatewayError):  # withheld: the error, as any error answer
                    sent, sent_type, new_status = result.body(), JSON, result.status
                elif result is not None:
                    sent = result
            check.finish()
        response = pb.ProcessingResponse.FromString(_replaced(sent, sent_type, new_status))
        if checked is not None:
            _merge_metadata(response, checked.check.metadata())
        _usage_metadata(response, translated.usage, translated.model, translated.error)
        return response.SerializeToString()

    def _on_piece(self, piece: bytes, last: bool) -> bytes:
        """One piece of a streamed answer: the client's events it completes (the end of the
        stream: the last ones, and the answer's usage into the metadata)."""
        stream = self._stream
        assert stream is not None
        out = stream.feed(piece)
        if last:
            out += stream.finish()
        checked = self._translated_check
        if checked is not None:  # the client's events, in OpenAI's shape: checked before they go on
            out = checked.check.feed(out, last)
            if last:
                checked.check.finish()
        response = pb.ProcessingResponse()
        common = response.response_body.response
        if out is not piece:
            if out:
                common.body_mutation.body = out
            else:
                common.body_mutation.clear_body = True
        else:
            response.response_body.SetInParent()
        decoder = stream.decoder
        if checked is not None:
            _merge_metadata(response, checked.check.metadata())
        if last:
            _usage_metadata(response, decoder.usage, decoder.model or self._model, decoder.error
                            or (None if decoder.complete else INCOMPLETE_CODE))
        elif decoder.error is not None and not self._error_reported:
            # at once: a client that reads the error event may hang up before the stream's end
            self._error_reported = True
            _usage_metadata(response, None, "", decoder.error)
        return response.SerializeToString()

    def on_close(self) -> None:
        if self._open:
            self._open = False
            self._inflight.streams -= 1
            checked = self._checked or self._translated_check
            if checked is not None:  # counted however it ended (a client gone mid-stream)
                checked.check.finish()


def _replaced(body: bytes, content_type: str, status: int | None) -> bytes:
    """A body answer replacing the whole answer's body, with its content type, length and status."""
    response = pb.ProcessingResponse()
    common = response.response_body.response
    mutation = common.header_mutation
    mutation.set_headers.extend([answers.header("content-type", content_type),
                                 answers.header("content-length", str(len(body)))])
    if status is not None:
        mutation.set_headers.append(answers.header(":status", str(status)))
    common.body_mutation.body = body
    return response.SerializeToString()


def _usage_metadata(response: pb.ProcessingResponse, counted: dict | None, model: str, error: str | None) -> None:
    """The answer's usage (OpenAI's shape), model and error type as the request's metadata, as
    Envoy's own readers write them for OpenAI's answers: the access log, metrics, prices and
    budgets read them."""
    values: dict[str, object] = {}
    if isinstance(counted, dict):
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if isinstance(counted.get(key), int):
                values[key] = counted[key]
        details = counted.get("prompt_tokens_details")
        if isinstance(details, dict) and isinstance(details.get("cached_tokens"), int):
            values["cached_tokens"] = details["cached_tokens"]
    if model:
        values["response_model"] = model
    if error:
        values["stream_error"] = error
    if values:
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(values)


def _merge_metadata(response: pb.ProcessingResponse, entries: bytes) -> None:
    """A data policy's entries (`AnswerCheck.metadata`, wire form) beside the usage in the
    request's namespace (merged as a Struct: the namespace's map entry would replace, not merge)."""
    if entries:
        extra = pb.ProcessingResponse.FromString(entries).dynamic_metadata.fields[METADATA_NAMESPACE]
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.MergeFrom(extra.struct_value)
