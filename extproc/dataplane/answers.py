"""The ext_proc's answers: header mutations, the rewritten body, the decision's metadata, and
the gateway's own answers (errors, the model list), mostly in prebuilt wire form.

Building protobuf objects per request cost more than deciding (docs/performance.md): what every
request to a target shares is serialized once and kept on the target; what varies per request
is appended in wire form (`extproc.protobuf_wire`).

Two security rules live here and only here: every attempt sets its own provider's key or
removes any (`set_credential`), and the client's Envoy/internal headers never reach the
router (`more_headers`).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import lru_cache

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from .. import protobuf_wire as wire
from ..errors import LOCAL_REPLIES, GatewayError
from ..policy import openai_api, provider_api
from ..policy.answer_format import AnswerPlan
from ..policy.caller import Caller
from ..policy.openai_api import Endpoint
from ..policy.pricing import Price
from ..policy.table import OPENAI_API, Route, Target
from ..protocol import ANSWER_HEADER, CLUSTER_HEADER, METADATA_NAMESPACE, TRANSLATE_HEADER, endpoint_header
from ..telemetry.trace_context import TRACEPARENT, TraceContext, attempt_span_id, traceparent

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
TIMEOUT_HEADER = "x-envoy-upstream-rq-timeout-ms"
# Headers the gateway sets itself on the first attempt: a client's value is overwritten anyway.
SET_BY_GATEWAY = frozenset({CLUSTER_HEADER, TIMEOUT_HEADER})
# The decision's metadata keys of a request whose answer is processed: what its client asked
# for, read by the answer's exchange (`extproc.dataplane.answer_exchange`) and by a retried
# attempt's rewrite (`extproc.dataplane.retry_processor`); the API the client speaks and the one
# the answering provider's bodies are in (absent: OpenAI's); whether each attempt's body is the
# client's own, translated per attempt (`extproc.policy.answer_format.per_attempt`).
CLIENT_STREAM, INCLUDE_USAGE = "client_stream", "include_usage"
CLIENT_API, PROVIDER_API, CLIENT_BODY = "client_api", "provider_api", "client_body"


def header(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode()
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw), append_action=_OVERWRITE)


def set_credential(mutation: pb.HeaderMutation, target: Target) -> None:
    """The one rule for keys: every attempt (the first, and each retry) sets its own provider's
    key, in its API's header (`authorization`, `api-key`, `x-api-key`, `x-goog-api-key`;
    Bedrock's signature is set per request, `request_headers`), and removes every other
    credential header: never the client's, never another provider's."""
    mutation.set_headers.extend(header(name, value) for name, value in provider_api.credential_headers(target))
    mutation.remove_headers.extend(provider_api.removed_credentials(target))


def attempt_mutation(mutation: pb.HeaderMutation, target: Target, path: str | None) -> None:
    """What every attempt to `target` sets: its path (None: set per request, `request_headers`),
    its host, its key."""
    if path is not None:
        mutation.set_headers.append(header(":path", path))
    mutation.set_headers.append(header(":authority", target.provider_host))
    set_credential(mutation, target)


def request_headers(path: str | None, headers: tuple[tuple[str, str], ...]) -> bytes:
    """A request's own path and headers (a Gemini or Bedrock path, Bedrock's signature), in wire
    form, to append to the headers' answer."""
    options = wire.header_option(":path", path.encode()) if path is not None else b""
    for name, value in headers:
        options += wire.header_option(name, value.encode())
    return wire.request_headers_set(options)


def target_mutation(target: Target, endpoint: Endpoint = openai_api.CHAT) -> pb.HeaderMutation:
    """A first attempt's header changes (built once per target and endpoint, by `prebuilt`):
    the attempt's path, host and key, the cluster, the content type, the provider's total bound."""
    mutation = pb.HeaderMutation()
    attempt_mutation(mutation, target, provider_api.static_path(endpoint, target))
    mutation.remove_headers.extend(provider_api.foreign_headers(endpoint, target))
    mutation.set_headers.extend([header(CLUSTER_HEADER, target.cluster), header("content-type", "application/json")])
    if target.timeout_s is not None:  # the provider's total bound: Envoy's router answers 504 past it
        mutation.set_headers.append(header(TIMEOUT_HEADER, str(int(target.timeout_s * 1000))))
    else:
        mutation.remove_headers.append(TIMEOUT_HEADER)
    # an uncompressed answer, so its usage can be read
    mutation.remove_headers.append("accept-encoding")
    return mutation


def prebuilt(target: Target, endpoint: Endpoint) -> tuple[bytes, bytes]:
    """What every answer to a request to this target shares, serialized once and kept on the
    target: the headers' answer (its header mutation, and the route cache cleared: the cluster
    header changed), and the decision's entries of the `llm_gateway` metadata (for the access
    log and metrics). The rest is appended in wire form per request."""
    built = target.answers.get(endpoint)
    if built is None:
        response = pb.ProcessingResponse()
        common = response.request_headers.response
        common.header_mutation.CopyFrom(target_mutation(target, endpoint))
        common.clear_route_cache = True
        decision = b"".join(wire.string_entry(key, value) for key, value in (
            ("route", target.route), ("rule", target.rule), ("provider", target.provider),
            ("provider_host", target.provider_host), ("operation", endpoint.operation)))
        if target.body_api != OPENAI_API:  # what the answer looks like (extproc.dataplane.answer_exchange)
            decision += wire.string_entry(PROVIDER_API, target.body_api)
        built = target.answers[endpoint] = (response.SerializeToString(), decision)
    return built


@lru_cache(maxsize=8192)
def content_length(length: int) -> bytes:
    return wire.request_headers_set(wire.header_option("content-length", str(length).encode()))


_STREAM_ENTRY = {True: wire.bool_entry("stream", True), False: wire.bool_entry("stream", False)}
CACHED_VALUES_MAX = 256  # longer request models or hosts (client-chosen) are encoded per request


@lru_cache(maxsize=4096)
def cached_decision_metadata(decision: bytes, model: str, stream: bool, host: str,
                             caller: bytes = b"") -> tuple[bytes, bytes]:
    """`decision_metadata`, kept for the few combinations that come back request after request."""
    return _decision_metadata(decision, model, stream, host, caller)


def _decision_metadata(decision: bytes, model: str, stream: bool, host: str,
                       caller: bytes = b"") -> tuple[bytes, bytes]:
    entries = (decision + wire.string_entry("request_model", model) + _STREAM_ENTRY[stream]
               + wire.string_entry("host", host) + caller)
    return entries, wire.dynamic_metadata(METADATA_NAMESPACE, entries)


def decision_metadata(decision: bytes, model: str, stream: bool, host: str, caller: bytes = b"") -> tuple[bytes, bytes]:
    """The decision's metadata entries, and the answer's `dynamic_metadata` holding just them:
    the same few combinations of target, model and host come back request after request, and
    encoding them costs about 2 µs per request (scripts/bench_work.py). Long values (a
    client-chosen model or host) are encoded per request and never cached. `caller`: the
    caller's entries (`caller_entries`)."""
    if len(model) + len(host) <= CACHED_VALUES_MAX:
        return cached_decision_metadata(decision, model, stream, host, caller)
    return _decision_metadata(decision, model, stream, host, caller)


def caller_entries(caller: Caller) -> bytes:
    """Who called, as the `llm_gateway` metadata entry `caller` for the access log: a struct of
    the namespace, the ServiceAccount, the workload and the pod, where known (one entry, so
    Envoy's file log formats one field for it). Encoded once per caller (kept on it); nothing for
    the gateway's own Envoy in local mode (`LOCAL`)."""
    memo = caller.memo
    kept = memo.get("entries")
    if kept is None:
        values = (("namespace", caller.namespace), ("service_account", caller.name if caller.namespace else None),
                  ("workload", caller.workload), ("pod", caller.pod))
        fields = b"".join(wire.string_entry(key, value) for key, value in values if value)
        kept = memo["entries"] = wire.struct_entry("caller", wire.struct_value(fields)) if fields else b""
    return kept


@lru_cache(maxsize=1024)
def price_entries(price: Price) -> bytes:
    """The price of the request's provider and model as `llm_gateway` metadata entries, for the
    access log's cost (Envoy's CEL) and the receiver's (exact): the currency, and the prices per
    million tokens as numbers. Encoded once per price."""
    from google.protobuf import struct_pb2

    per_input, per_output, per_cached = price.per_million()
    return struct_pb2.Struct(fields={
        "currency": struct_pb2.Value(string_value=price.currency),
        "price_input": struct_pb2.Value(number_value=per_input),
        "price_output": struct_pb2.Value(number_value=per_output),
        "price_cached_input": struct_pb2.Value(number_value=per_cached)}).SerializeToString(deterministic=True)


def with_price(target: Target, decision: bytes, model: str) -> bytes:
    """The decision's entries with the price of `model` at the target's provider (as they are where
    it has none), kept on the target per priced model: the same bytes object every time, so the
    metadata built from it is cached too (`decision_metadata`)."""
    price = target.prices.get(model)
    if price is None:
        return decision
    key = ("price", decision, model)
    built = target.answers.get(key)
    if built is None:
        built = target.answers[key] = (decision + price_entries(price), b"")
    return built[0]


def price_values(price: Price | None) -> dict[str, object]:
    """The same, as plain values (the retry processor's metadata update); an unpriced provider
    clears the currency, so a failed-over request is never charged at the first provider's price."""
    if price is None:
        return {"currency": ""}
    per_input, per_output, per_cached = price.per_million()
    return {"currency": price.currency, "price_input": per_input, "price_output": per_output,
            "price_cached_input": per_cached}


def trace_parts(trace: TraceContext) -> tuple[bytes, bytes]:
    """A sampled request's `traceparent` for its first attempt (a header mutation to append to
    the headers' answer), and the trace's ids as metadata entries (for the spans the access-log
    receiver builds, and the retry processor's later attempts)."""
    header_part = wire.request_headers_set(wire.header_option(
        TRACEPARENT, traceparent(trace.trace_id, attempt_span_id(trace.span_id, 1)).encode()))
    entries = (wire.string_entry("trace_id", trace.trace_id) + wire.string_entry("span_id", trace.span_id)
               + wire.string_entry("parent_span_id", trace.parent_span_id))
    return header_part, entries


@lru_cache(maxsize=256)
def _attempt_options(attempt_headers: tuple[tuple[str, str], ...]) -> tuple[base_pb2.HeaderValueOption, ...]:
    """A rule's attempt-order headers as protobuf, once per order (a few per rule)."""
    return tuple(header(k, v) for k, v in attempt_headers)


_ANSWER_OPTION = header(ANSWER_HEADER, b"1")
_TRANSLATE_OPTION = header(TRANSLATE_HEADER, b"1")


def more_headers(strip: list[str], attempt_headers: tuple[tuple[str, str], ...], answer: bool = False,
                 translate: bool = False) -> bytes:
    """The mutations only some requests need (a rule with retries, a client's x-envoy-* headers,
    an answer to process, every attempt translated), appended to the headers' answer. Whatever
    the gateway sets itself is overwritten anyway; the rest of what a client may not set goes."""
    response = pb.ProcessingResponse()
    mutation = response.request_headers.response.header_mutation
    if answer:  # Envoy's answer filter runs for this request (a client's own value is overwritten)
        mutation.set_headers.append(_ANSWER_OPTION)
        strip = [name for name in strip if name != ANSWER_HEADER]
    if translate:  # the first attempt, too, is rewritten by the failover cluster's upstream ext_proc
        mutation.set_headers.append(_TRANSLATE_OPTION)
        strip = [name for name in strip if name != TRANSLATE_HEADER]
    if attempt_headers:
        mutation.set_headers.extend(_attempt_options(attempt_headers))
        if strip:  # a client's x-envoy-retry-on and the like: overwritten, not removed
            overwritten = {name for name, _ in attempt_headers}
            strip = [name for name in strip if name not in overwritten]
    mutation.remove_headers.extend(name for name in strip if name not in SET_BY_GATEWAY)
    return response.SerializeToString()


def endpoint_headers(picked: tuple[tuple[str, str], ...]) -> bytes:
    """Per pool cluster of the request's attempts, the endpoint picked for it: the header that
    cluster's ORIGINAL_DST load balancing reads (`extproc.envoy.pools`)."""
    return wire.request_headers_set(b"".join(wire.header_option(endpoint_header(cluster), endpoint.encode())
                                             for cluster, endpoint in picked))


def endpoint_entry(endpoint: str) -> bytes:
    """The first attempt's model server, as the `llm_gateway` metadata entry `endpoint` (the
    access-log receiver counts it finished)."""
    return wire.string_entry("endpoint", endpoint) if endpoint else b""


_PLAN_ENTRIES = {(stream, usage): wire.bool_entry(CLIENT_STREAM, stream) + wire.bool_entry(INCLUDE_USAGE, usage)
                 for stream in (True, False) for usage in (True, False)}


_CLIENT_BODY = wire.bool_entry(CLIENT_BODY, True)


@lru_cache(maxsize=64)
def plan_entries(plan: AnswerPlan, client_body: bool = False) -> bytes:
    """The decision's metadata entries that carry what the client asked for to its answer (and
    to each attempt's rewrite)."""
    entries = _PLAN_ENTRIES[plan.client_stream, plan.include_usage]
    if plan.client_api != OPENAI_API:
        entries += wire.string_entry(CLIENT_API, plan.client_api)
    return entries + _CLIENT_BODY if client_body else entries


# The decision's metadata entry of a request whose answer a data policy checks (`responses.check`,
# `AnswerPlan.check`): the answer's exchange checks it (`extproc.dataplane.answer_check`).
CHECK_ANSWER = "check_answer"
CHECK_ENTRY = wire.bool_entry(CHECK_ANSWER, True)


def model_list(route: Route, authority: str) -> pb.ProcessingResponse:
    """`GET .../models`: OpenAI's list, from the config (`extproc.policy.openai_api.model_list`)."""
    response = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=200),
        headers=pb.HeaderMutation(set_headers=[header("content-type", "application/json")]),
        body=openai_api.model_list(route), details="llm_gateway_models"))
    response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(
        {"route": route.name, "operation": openai_api.MODELS.operation, "host": authority})
    return response


def immediate(error: GatewayError, client_api: str = OPENAI_API) -> pb.ProcessingResponse:
    """The gateway's own answer to an error: its status, its JSON body in the client's API's
    shape (OpenAI's; Anthropic's for a client of the Messages API), its headers (a 429's
    Retry-After and x-ratelimit-*, a 503's Retry-After)."""
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),
        headers=pb.HeaderMutation(set_headers=[header("content-type", "application/json"),
                                                *(header(k, v) for k, v in error.headers)]),
        body=error.body(client_api),
        details=f"llm_gateway_{error.code}",
    ))


def continue_phase(phase: str | None) -> pb.ProcessingResponse:
    """An answer that changes nothing, for a phase the gateway does not process."""
    response = pb.ProcessingResponse()
    if phase in ("response_headers", "response_body", "request_trailers", "response_trailers"):
        getattr(response, phase).SetInParent()
    return response


def with_operation(response: pb.ProcessingResponse, operation: str, route: str | None = None,
                   more: tuple[tuple[str, str], ...] = ()) -> pb.ProcessingResponse:
    """A refusal's answer, counted under its endpoint's operation and, once decided, its route (with
    what else the refusal tells the access log: a data policy's rule)."""
    entries: dict[str, str] = {"operation": operation, **dict(more)}
    if route is not None:
        entries["route"] = route
    response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(entries)
    return response


TOO_LARGE_CODE = LOCAL_REPLIES[413][0]  # the code Envoy gives its own 413s
EMPTIED_CHUNK = pb.ProcessingResponse(request_body=pb.BodyResponse(
    response=pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True)))).SerializeToString()


def body_answers(headers_answer: Iterable[bytes], chunks: int, body: bytes) -> list[bytes]:
    """The held answer to the headers, then one answer per body chunk: all emptied but the last,
    which carries the whole rewritten body."""
    return [b"".join(headers_answer), *([EMPTIED_CHUNK] * (chunks - 1)), wire.request_body_replaced(body)]
