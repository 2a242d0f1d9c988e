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

An answer a data policy checks (`responses.check`, marked `check_answer` in the decision) is
handed to `extproc.dataplane.answer_check` at its headers: read whole (JSON, or converted), or
piece by piece where the client reads the provider's stream as a stream (Envoy is told to send
the body in pieces, `mode_override` STREAMED), so that it stays incremental.

The stream is open from the answer's headers to its last byte: for a provider's stream turned
into one JSON answer, as long as the provider streams. Each open one counts as an ext_proc stream
(`Inflight.streams`), which a graceful drain waits for.
"""

from __future__ import annotations

import logging

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..policy.answer_format import AnswerPlan, conversion
from ..policy.body_memory import Inflight
from ..policy.caller import LOCAL, Caller
from ..protocol import METADATA_NAMESPACE
from . import answers
from .answer_check import AnswerGuards, CheckedAnswer
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
    __slots__ = ("_inflight", "_plan", "_converter", "_open", "_guards", "_caller", "_checked")

    def __init__(self, inflight: Inflight, guards: AnswerGuards | None = None, caller: Caller = LOCAL):
        self._inflight = inflight
        inflight.streams += 1
        self._open = True
        self._plan: AnswerPlan | None = None
        self._converter: Converter | None = None
        self._guards = guards
        self._caller = caller  # the Envoy the answer comes through: the request's caller
        self._checked: CheckedAnswer | None = None  # a data policy checks this answer

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        request = pb.ProcessingRequest.FromString(message)
        phase = request.WhichOneof("request")
        try:
            if phase == "response_headers":
                return [self._on_headers(request)], self._converter is None and self._checked is None
            if phase == "response_body" and self._checked is not None:
                return self._checked.body(request.response_body)
            if phase == "response_body" and self._converter is not None and self._plan is not None:
                return [self._on_body(request.response_body.body)], True
        except Exception:  # a bug: the answer passes as the provider sent it, never a stack trace
            if self._checked is not None:  # ... but a checked one: never unchecked
                return self._checked.failed(phase, phase == "response_body" and request.response_body.end_of_stream)
            log.exception("answer exchange failed on %s", phase)
            self._converter = None
            return [PASS if phase == "response_headers" else UNCHANGED_BODY], True
        return [answers.continue_phase(phase).SerializeToString()], phase == "response_body"

    def _on_headers(self, request: pb.ProcessingRequest) -> bytes:
        decision = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        fields = decision.fields if decision is not None else {}
        if answers.CLIENT_STREAM not in fields:  # not a marked request (cannot happen with our config)
            return PASS
        self._plan = plan = AnswerPlan(fields[answers.CLIENT_STREAM].bool_value,
                                       answers.INCLUDE_USAGE in fields and fields[answers.INCLUDE_USAGE].bool_value)
        status, content_type = 0, ""
        for h in request.response_headers.headers.headers:
            if h.key == ":status":
                status = int(h.raw_value or b"0")
            elif h.key == "content-type":
                content_type = h.raw_value.decode("latin-1")
        kind = conversion(plan.client_stream, status, content_type)
        if (self._guards is not None and answers.CHECK_ANSWER in fields
                and not request.response_headers.end_of_stream):  # a data policy checks it
            self._checked = self._guards.checked(fields, self._caller, plan, status, content_type, kind)
            if self._checked is not None:
                return self._checked.headers()
        if kind is None or request.response_headers.end_of_stream:  # nothing to convert, or no body to do it on
            return PASS
        self._converter = CONVERTERS[kind]
        return CONTINUE_HEADERS  # the body comes next, whole

    def _on_body(self, body: bytes) -> bytes:
        assert self._converter is not None and self._plan is not None
        converted = self._converter(body, self._plan)
        if converted is None:  # not an answer the converter can read: the client gets it as it came
            log.warning("an answer could not be converted to the client's format: passed on as the provider sent it")
            return UNCHANGED_BODY
        response = pb.ProcessingResponse()
        common = response.response_body.response
        mutation = common.header_mutation
        mutation.set_headers.extend([answers.header("content-type", converted.content_type),
                                     answers.header("content-length", str(len(converted.body)))])
        if converted.status is not None:
            mutation.set_headers.append(answers.header(":status", str(converted.status)))
        common.body_mutation.body = converted.body
        return response.SerializeToString()

    def on_close(self) -> None:
        if self._open:
            self._open = False
            self._inflight.streams -= 1
            if self._checked is not None:  # counted however it ended (a client gone mid-stream)
                self._checked.check.finish()
