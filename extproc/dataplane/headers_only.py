"""The ext_proc's answer on the headers-only path (issue 32): an EXPERIMENT, off unless
`LLM_GATEWAY_HEADERS_ONLY_PATH=true`, measured and not adopted
(docs/decisions/0008-headers-only-path.md). With it on, Envoy's ext_proc gets no request body
(`extproc.envoy.body_transform`: its transform filter reads `stream` into a header before the
ext_proc and writes the decision's `model` and `stream_options` into the body after), and every
request is answered at its headers, from here.

Only routes `extproc.policy.body_path.body_needs` finds nothing for, and only OpenAI's chat
endpoint, can be served so: any other request is refused (500 `body_path_unsupported`) rather
than forwarded unchecked; this is why the switch is for measuring, never for serving."""

from __future__ import annotations

import os
from collections.abc import Mapping

from .. import protobuf_wire as wire
from ..envoy.body_transform import BODY_READ_HEADER, BODY_STREAM_HEADER, STREAM_OPTIONS_KEY
from ..errors import GatewayError
from ..policy.body_path import body_needs
from ..policy.budget_gate import Admitted
from ..policy.decide import Decision
from ..policy.openai_api import CHAT
from ..policy.table import RoutingTable
from ..protocol import METADATA_NAMESPACE
from ..telemetry.trace_context import TraceContext
from . import answers

SWITCH = "LLM_GATEWAY_HEADERS_ONLY_PATH"
UNSUPPORTED_CODE = "body_path_unsupported"
_STREAM_OPTIONS = wire.struct_entry(STREAM_OPTIONS_KEY, wire.struct_value(wire.bool_entry("include_usage", True)))
_STREAMS = {None: False, b"false": False, b"true": True}


def headers_only_path(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the experiment is on (the switch set to true)."""
    env = os.environ if environ is None else environ
    return env.get(SWITCH, "").strip().lower() == "true"


def headers_only_answer(table: RoutingTable, decision: Decision, budget: Admitted | None, trace: TraceContext | None,
                        caller_entries: bytes, contents: bool) -> bytes:
    """The answer to the headers, which is the request's whole answer: the target's routing
    headers, the decision's metadata with the model the write filter puts into the body, and
    `stream_options` where the client asked for a stream. Raises GatewayError for a body Envoy
    could not parse (400) and for a request this path cannot serve (500)."""
    target, endpoint, headers = decision.target, decision.endpoint, decision.headers
    if endpoint is not CHAT or body_needs(decision.route, table, contents) or not target.model:
        raise GatewayError(500, "this request needs its body in the gateway, which the headers-only path "
                                f"({SWITCH}) does not give it", UNSUPPORTED_CODE)
    if BODY_READ_HEADER not in headers:  # Envoy's transform filter could not parse it: never forwarded as sent
        raise GatewayError(400, "request body is not valid JSON (sent as application/json, each name once)",
                           "invalid_json")
    stream = _STREAMS.get(headers.get(BODY_STREAM_HEADER), None)
    if stream is None:
        raise GatewayError(400, "'stream' must be true or false", "invalid_stream")
    model = target.model
    headers_answer, prebuilt = answers.prebuilt(target, endpoint)
    parts = [headers_answer]
    if decision.strip:  # the client's (and the read filter's) internal headers go here
        parts.append(answers.more_headers(decision.strip, ()))
    if target.prices:
        prebuilt = answers.with_price(target, prebuilt, model)
    entries, metadata = answers.decision_metadata(prebuilt, model, stream, decision.authority, caller_entries)
    more = _STREAM_OPTIONS if stream else b""
    if budget is not None:
        more += budget.encoded()
    if trace is not None:
        header_part, trace_entries = answers.trace_parts(trace)
        parts.append(header_part)
        more += trace_entries
    if more:
        metadata = wire.dynamic_metadata(METADATA_NAMESPACE, entries + more)
    parts.append(metadata)
    return b"".join(parts)
