"""The ext_proc gRPC service: Envoy's messages in, routing decisions and mutations out.

Per request Envoy sends the request headers and, without waiting for their answer, the body
in chunks (usually one). The route, rule and provider are chosen from the headers (or the
request is answered with an error at once); the answer to the headers is held until the body
is whole, so that one round trip carries everything: the headers' answer (every header
mutation routing needs, the rewritten body's length, the decision as dynamic metadata for the
access log) and the chunks' answers (the rewritten body in the last one). Everything that
does not depend on the request is prebuilt per target, once.

Answers do not come here: Envoy reads their model, usage and error events itself
(json_to_metadata, sse_to_metadata; see `extproc.envoy_config`).
"""

from __future__ import annotations

import logging
import random
import time
from functools import lru_cache
from typing import TYPE_CHECKING, Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from .auth import LOCAL, Identity, may_use
from . import endpoints
from .endpoints import Endpoint
from .admission import Inflight, Overloaded
from .envoy_config import DEFAULT_BODY_LIMIT, LOCAL_REPLIES
from .errors import GatewayError
from .gateways import refusal
from .names import CLUSTER_HEADER, INTERNAL_HEADER_PREFIX, METADATA_NAMESPACE
from . import wire
from .rewrite import rewrite_body
from .routing import Route, RoutingTable, Target
from .failover import FAILOVER_BODY_MAX, PassiveHealth
from .retry_rewrite import first_attempt

if TYPE_CHECKING:
    from .budget_store import Admitted, BudgetGate

log = logging.getLogger("extproc.server")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"


class TableHolder:
    """The routing table in force. Replaced whole on a config change; a request keeps the table
    it started with, so a change never fails a request in flight."""

    def __init__(self, table: RoutingTable):
        self.table = table


def _header(key: str, value: str | bytes) -> base_pb2.HeaderValueOption:
    raw = value if isinstance(value, bytes) else value.encode()
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=raw), append_action=_OVERWRITE)


def _target_mutation(target: Target, endpoint: Endpoint = endpoints.CHAT) -> pb.HeaderMutation:
    """Header changes for a target (built once, by `_prebuilt`): path, host, key, cluster, content type."""
    mutation = pb.HeaderMutation(set_headers=[
        _header(":path", endpoints.upstream_path(endpoint, target)),
        _header(":authority", target.provider_host),
        _header(CLUSTER_HEADER, target.cluster),
        _header("content-type", "application/json"),
    ])
    if target.timeout_s is not None:  # the provider's total bound: Envoy's router answers 504 past it
        mutation.set_headers.append(_header("x-envoy-upstream-rq-timeout-ms", str(int(target.timeout_s * 1000))))
    else:
        mutation.remove_headers.append("x-envoy-upstream-rq-timeout-ms")
    if target.api_key:
        mutation.set_headers.append(_header("authorization", f"Bearer {target.api_key}"))
    else:
        mutation.remove_headers.append("authorization")
    # an uncompressed answer, so its usage can be read
    mutation.remove_headers.append("accept-encoding")
    return mutation


def _prebuilt(target: Target, endpoint: Endpoint) -> tuple[bytes, bytes]:
    """What every answer to a request to this target shares, serialized once and kept on the
    target: the headers' answer (its header mutation, and the route cache cleared: the cluster
    header changed), and the decision's entries of the `llm_gateway` metadata (for the access
    log and metrics). The rest is appended in wire form per request (`extproc.wire`)."""
    built = target.answers.get(endpoint)
    if built is None:
        response = pb.ProcessingResponse()
        common = response.request_headers.response
        common.header_mutation.CopyFrom(_target_mutation(target, endpoint))
        common.clear_route_cache = True
        decision = b"".join(wire.string_entry(key, value) for key, value in (
            ("route", target.route), ("rule", target.rule), ("provider", target.provider),
            ("provider_host", target.provider_host), ("operation", endpoint.operation)))
        built = target.answers[endpoint] = (response.SerializeToString(), decision)
    return built


@lru_cache(maxsize=8192)
def _content_length(length: int) -> bytes:
    return wire.request_headers_set(wire.header_option("content-length", str(length).encode()))


_STREAM_ENTRY = {True: wire.bool_entry("stream", True), False: wire.bool_entry("stream", False)}
_CACHED_VALUES_MAX = 256  # longer request models or hosts (client-chosen) are encoded per request


@lru_cache(maxsize=4096)
def _decision_metadata(decision: bytes, model: str, stream: bool, host: str) -> tuple[bytes, bytes]:
    """The decision's metadata entries, and the answer's `dynamic_metadata` holding just them:
    the same few combinations of target, model and host come back request after request, and
    encoding them costs about 2 µs per request (scripts/bench_work.py)."""
    entries = decision + wire.string_entry("request_model", model) + _STREAM_ENTRY[stream] + wire.string_entry("host", host)
    return entries, wire.dynamic_metadata(METADATA_NAMESPACE, entries)


def _more_headers(strip: list[str], failover_headers) -> bytes:
    """The mutations only some requests need (a rule with retries, a client's x-envoy-*
    headers), appended to the headers' answer."""
    response = pb.ProcessingResponse()
    mutation = response.request_headers.response.header_mutation
    if failover_headers:
        mutation.set_headers.extend(failover_headers)
        if strip:  # a client's x-envoy-retry-on and the like: overwritten, not removed
            overwritten = {h.header.key for h in failover_headers}
            strip = [name for name in strip if name not in overwritten]
    # whatever the gateway sets itself is overwritten anyway; the rest goes
    mutation.remove_headers.extend(name for name in strip if name not in _SET_BY_GATEWAY)
    return response.SerializeToString()


class _Reply(Exception):
    """A request the gateway answers itself with a success: the model list."""

    def __init__(self, response: pb.ProcessingResponse):
        self.response = response


def _model_list(route: Route, authority: str) -> pb.ProcessingResponse:
    """`GET .../models`: OpenAI's list, from the config (`extproc.endpoints.model_list`)."""
    response = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=200),
        headers=pb.HeaderMutation(set_headers=[_header("content-type", "application/json")]),
        body=endpoints.model_list(route), details="llm_gateway_models"))
    response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(
        {"route": route.name, "operation": endpoints.MODELS.operation, "host": authority})
    return response


def immediate(error: GatewayError) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),
        # with the error's own headers: a 429's Retry-After and x-ratelimit-*, a 503's Retry-After
        headers=pb.HeaderMutation(set_headers=[_header("content-type", "application/json"),
                                                *(_header(k, v) for k, v in getattr(error, "headers", ()))]),
        body=error.body(),
        details=f"llm_gateway_{error.code}",
    ))
    return response


_TOO_LARGE_CODE, _TOO_LARGE_MESSAGE = LOCAL_REPLIES[413]  # the answer Envoy gives its own 413s
_EMPTIED_CHUNK = pb.ProcessingResponse(request_body=pb.BodyResponse(
    response=pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True)))).SerializeToString()
_CLIENT_MUST_NOT_SET = ("x-envoy-", INTERNAL_HEADER_PREFIX)
_SET_BY_GATEWAY = frozenset({CLUSTER_HEADER, "x-envoy-upstream-rq-timeout-ms"})


class ExternalProcessor:
    """The ext_proc service. `exchange()` makes the state of one stream, which the lean HTTP/2
    server (`extproc.h2_server`) drives message by message."""

    def __init__(self, holder: TableHolder, draw: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time, body_limit: int = DEFAULT_BODY_LIMIT,
                 budgets: "BudgetGate | None" = None, inflight: Inflight | None = None,
                 health: PassiveHealth | None = None):
        self._holder = holder
        self._budgets = budgets  # token/request budgets (extproc.budget_store)
        self._draw = draw
        self._clock = clock
        self._body_limit = body_limit
        self.inflight = inflight or Inflight()
        self._health = health if health is not None else PassiveHealth()

    def exchange(self, identity: Identity = LOCAL) -> "Exchange":
        return Exchange(self, identity.namespace)

    def _choose(self, headers_msg: pb.HttpHeaders, namespace: str | None = None
                ) -> tuple[str, Target, list[str], Endpoint, bytes, tuple, dict[str, bytes]]:
        """The target, the client headers that must not reach Envoy's router or the provider
        (`x-envoy-*`: timeouts, retries; and the gateway's own), the endpoint, the declared body
        length, for a rule with retries the headers that give Envoy the attempt order and the
        retry policy, and the request's headers by name (read once, for rules and budgets). A
        route the caller's namespace may not use is answered as an unknown host."""
        # a name sent twice: the last value, as everywhere (a comprehension: a µs less than a loop)
        raw: dict[str, bytes] = {h.key: h.raw_value for h in headers_msg.headers.headers}
        authority = raw.get(":authority", b"").decode("latin-1")
        length = raw.get("content-length", b"")
        strip = [key for key in raw if key.startswith(_CLIENT_MUST_NOT_SET)]
        route = self._holder.table.route_for(authority)
        if route is None or not may_use(namespace, route.visible):
            raise (refusal(self._holder.table, authority) if route is None else None) or GatewayError(
                404, f"no LLMRoute or LLMProvider serves host {authority!r}", "unknown_host")
        endpoint = endpoints.recognize(raw.get(":method", b"").decode("latin-1"),
                                       raw.get(":path", b"").decode("latin-1"), route.bases)
        if endpoint is endpoints.MODELS:
            raise _Reply(_model_list(route, authority))
        if headers_msg.end_of_stream:
            raise GatewayError(400, f"request body is required: a JSON {endpoint.name} request", "missing_body")
        watched = route.match_headers
        values = {key: raw[key].decode("latin-1") for key in watched if key in raw} if watched else {}
        rule = route.select(values)
        if rule is None:
            raise GatewayError(404, f"no rule of route {route.name} matches the request", "no_matching_rule")
        if rule.failover is None:
            return authority, rule.pick(self._draw()), strip, endpoint, length, (), raw
        # a rule with retries: the first provider of the attempt order, and the headers that give
        # Envoy the order and the retry policy (extproc.retry_rewrite)
        target, failover_headers = first_attempt(rule.failover, rule.pick_index(self._draw()),
                                                 self._health.cooling(self._clock()))
        return authority, target, strip, endpoint, length, failover_headers, raw

    @staticmethod
    def _forward(body: bytes, chunks: int, target: Target, authority: str,
                 strip: list[str], endpoint: Endpoint = endpoints.CHAT,
                 budget: "Admitted | None" = None, failover_headers=()) -> list[bytes]:
        """The held answer to the headers, then one answer per body chunk: all emptied but the
        last, which carries the whole rewritten body. In wire form: the target's prebuilt part
        and what this request adds (`extproc.wire`)."""
        rewritten = rewrite_body(body, target, endpoint)
        length = len(rewritten.body)
        headers_answer, decision = _prebuilt(target, endpoint)
        parts = [headers_answer, _content_length(length)]
        if length > FAILOVER_BODY_MAX:  # larger: one attempt (docs/failover.md)
            failover_headers = ()
        if strip or failover_headers:
            parts.append(_more_headers(strip, failover_headers))
        if len(rewritten.model) + len(authority) <= _CACHED_VALUES_MAX:
            entries, metadata = _decision_metadata(decision, rewritten.model, rewritten.stream, authority)
        else:
            entries, metadata = _decision_metadata.__wrapped__(decision, rewritten.model, rewritten.stream, authority)
        if budget is not None:  # the budget charged, for the access log, and the x-ratelimit-* header values
            metadata = wire.dynamic_metadata(METADATA_NAMESPACE, entries + budget.encoded())
        parts.append(metadata)
        return [b"".join(parts), *([_EMPTIED_CHUNK] * (chunks - 1)), wire.request_body_replaced(rewritten.body)]


class Exchange:
    """One ext_proc stream (one HTTP request). The request's messages are answered all at once
    when its body is whole (or at once with an error). The stream ends as soon as nothing more is needed, before Envoy has to cancel it."""

    __slots__ = ("_processor", "_namespace", "_target", "_authority", "_strip", "_body", "_chunks",
                 "_endpoint", "_budget", "_held", "_failover")

    def __init__(self, processor: ExternalProcessor, namespace: str | None = None):
        self._processor = processor
        self._namespace = namespace  # the caller's (see extproc.auth); None: may use everything
        self._held = 0  # body bytes reserved in processor.inflight, given back on close
        inflight = processor.inflight
        inflight.streams += 1
        inflight.opened += 1
        self._target: Target | None = None
        self._authority = ""
        self._strip: list[str] = []
        self._failover: tuple = ()  # a rule with retries: the attempt order's headers
        self._body = bytearray()
        self._chunks = 0
        self._endpoint = endpoints.CHAT
        self._budget: Admitted | None = None

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        """The answers this message completes, in wire form (none while the request body is
        incomplete), and whether the stream is over: for the HTTP/2 server."""
        return self._answer(pb.ProcessingRequest.FromString(message))

    def on_request(self, request: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        """The same, as protobuf messages (tests, tools)."""
        answers, done = self._answer(request)
        return [pb.ProcessingResponse.FromString(answer) for answer in answers], done

    def _answer(self, request: pb.ProcessingRequest) -> tuple[list[bytes], bool]:
        phase = request.WhichOneof("request")
        processor = self._processor
        try:
            if phase == "request_headers":
                (self._authority, self._target, self._strip, self._endpoint, length,
                 self._failover, raw) = processor._choose(request.request_headers, self._namespace)
                if length:
                    self._admit(_length(length), processor)
                if processor._budgets is not None:
                    self._budget = processor._budgets.admit(self._target.route, raw)
                return [], False  # answered with the body
            if phase == "request_body":
                if self._target is None:  # cannot happen with our bootstrap; never forward unrewritten
                    raise GatewayError(500, "request body arrived before its headers", "internal_error")
                chunk = request.request_body
                self._body += chunk.body
                self._chunks += 1
                if len(self._body) > processor._body_limit:
                    raise GatewayError(413, _TOO_LARGE_MESSAGE, _TOO_LARGE_CODE)
                if len(self._body) > self._held:  # more than declared (or nothing was)
                    self._admit(len(self._body), processor)
                if not chunk.end_of_stream:
                    return [], False
                return processor._forward(bytes(self._body), self._chunks, self._target, self._authority, self._strip,
                                          self._endpoint, self._budget, self._failover), True
            return [_continue(phase).SerializeToString()], False
        except GatewayError as error:
            response = immediate(error)
            if phase == "request_body":  # a refused body: counted under its endpoint's operation
                response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(
                    {"operation": self._endpoint.operation})
            return [response.SerializeToString()], True
        except _Reply as reply:
            return [reply.response.SerializeToString()], True
        except Exception:  # never a stack trace to the client, never a request sent unrewritten
            log.exception("ext_proc failed on %s", phase)
            if phase in ("request_headers", "request_body"):
                return [immediate(GatewayError(500, "the gateway failed to process the request",
                                               "internal_error")).SerializeToString()], True
            return [_continue(phase).SerializeToString()], False  # an answer already under way is passed on as it is


    def _admit(self, size: int, processor: ExternalProcessor) -> None:
        """Hold `size` body bytes in all (up to the body limit, which answers 413 past it), or 503."""
        more = min(size, processor._body_limit) - self._held
        if more > 0:
            if not processor.inflight.take(more):
                raise Overloaded(size, processor.inflight.cap)
            self._held += more

    def on_close(self) -> None:
        """The stream is over, however it ended: its body bytes are no longer held."""
        inflight = self._processor.inflight
        if self._held >= 0:
            inflight.streams -= 1
            inflight.give_back(self._held)
            self._held = -1


def _length(value: bytes) -> int:
    try:
        return int(value)
    except ValueError:  # Envoy refuses such a request before; never trust it here either
        return 0


def _continue(phase: str | None) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    if phase in ("response_headers", "response_body", "request_trailers", "response_trailers"):
        getattr(response, phase).SetInParent()
    return response
