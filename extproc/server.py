"""The ext_proc gRPC service: Envoy's messages in, routing decisions and mutations out.

Per request Envoy sends the request headers and, without waiting for their answer, the body
in chunks (usually one). The route, rule and provider are chosen from the headers (or the
request is answered with an error at once); the answer to the headers is held until the body
is whole, so that one round trip carries everything: the headers' answer (every header
mutation routing needs, the rewritten body's length, the decision as dynamic metadata for the
access log) and the chunks' answers (the rewritten body in the last one). Everything that
does not depend on the request is prebuilt per target, once.

A second ext_proc filter sends only server-sent-event answers here, chunk by chunk: they are
passed on unchanged while their content and usage events are read (see `extproc.sse`).
"""

from __future__ import annotations

import logging
import random
import time
from functools import lru_cache
from typing import Callable

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.type.v3 import http_status_pb2

from google.protobuf import struct_pb2

from .envoy_config import DEFAULT_BODY_LIMIT, LOCAL_REPLIES
from .errors import GatewayError
from .names import CLUSTER_HEADER, INTERNAL_HEADER_PREFIX, METADATA_NAMESPACE
from .rewrite import rewrite_body
from .routing import RoutingTable, Target
from .failover import FAILOVER_BODY_MAX, PassiveHealth
from .retry_rewrite import first_attempt
from .sse import SSEReader

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


@lru_cache(maxsize=4096)
def _target_mutation(target: Target) -> pb.HeaderMutation:
    """Header changes for a target, built once: path, host, key, cluster, content type."""
    mutation = pb.HeaderMutation(set_headers=[
        _header(":path", target.path),
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


@lru_cache(maxsize=4096)
def _target_metadata(target: Target) -> struct_pb2.Struct:
    """The decision, for the access log and metrics: `llm_gateway` dynamic metadata."""
    meta = struct_pb2.Struct()
    meta.fields[METADATA_NAMESPACE].struct_value.update({
        "route": target.route, "rule": target.rule, "provider": target.provider, "provider_host": target.provider_host,
    })
    return meta


def immediate(error: GatewayError) -> pb.ProcessingResponse:
    return pb.ProcessingResponse(immediate_response=pb.ImmediateResponse(
        status=http_status_pb2.HttpStatus(code=error.status),
        headers=pb.HeaderMutation(set_headers=[_header("content-type", "application/json")]),
        body=error.body(),
        details=f"llm_gateway_{error.code}",
    ))


_TOO_LARGE_CODE, _TOO_LARGE_MESSAGE = LOCAL_REPLIES[413]  # the answer Envoy gives its own 413s
_EMPTIED_CHUNK = pb.ProcessingResponse(request_body=pb.BodyResponse(
    response=pb.CommonResponse(body_mutation=pb.BodyMutation(clear_body=True))))
_CLIENT_MUST_NOT_SET = ("x-envoy-", INTERNAL_HEADER_PREFIX)
_SET_BY_GATEWAY = frozenset({CLUSTER_HEADER, "x-envoy-upstream-rq-timeout-ms"})


class ExternalProcessor:
    """The ext_proc service. `exchange()` makes the state of one stream, which the lean HTTP/2
    server (`extproc.h2_server`) drives message by message."""

    def __init__(self, holder: TableHolder, draw: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time, body_limit: int = DEFAULT_BODY_LIMIT,
                 health: PassiveHealth | None = None):
        self._holder = holder
        self._draw = draw
        self._clock = clock
        self._body_limit = body_limit
        self._health = health if health is not None else PassiveHealth()

    def exchange(self) -> "Exchange":
        return Exchange(self)

    def _choose(self, headers_msg: pb.HttpHeaders) -> tuple[str, Target, list[str], tuple]:
        """The target, and the client headers that must not reach Envoy's router or the provider:
        `x-envoy-*` (timeouts, retries) and the gateway's own."""
        headers = headers_msg.headers.headers
        authority = method = ""
        strip: list[str] = []
        for h in headers:
            key = h.key
            if key == ":authority":
                authority = h.raw_value.decode("latin-1")
            elif key == ":method":
                method = h.raw_value.decode("latin-1")
            elif key.startswith(_CLIENT_MUST_NOT_SET):
                strip.append(key)
        route = self._holder.table.route_for(authority)
        if route is None:
            raise GatewayError(404, f"no LLMRoute or LLMProvider serves host {authority!r}", "unknown_host")
        if method != "POST":
            raise GatewayError(405, f"method {method} not allowed: send a POST with a chat request", "method_not_allowed")
        if headers_msg.end_of_stream:
            raise GatewayError(400, "request body is required: a JSON chat request", "missing_body")
        watched = route.match_headers
        values = {h.key: h.raw_value.decode("latin-1") for h in headers if h.key in watched} if watched else {}
        rule = route.select(values)
        if rule is None:
            raise GatewayError(404, f"no rule of route {route.name} matches the request", "no_matching_rule")
        if rule.failover is None:
            return authority, rule.pick(self._draw()), strip, ()
        # a rule with retries: the first provider of the attempt order, and the headers that give
        # Envoy the order and the retry policy (extproc.retry_rewrite)
        target, failover_headers = first_attempt(rule.failover, rule.pick_index(self._draw()),
                                                 self._health.cooling(self._clock()))
        return authority, target, strip, failover_headers

    @staticmethod
    def _forward(body: bytes, chunks: int, target: Target, started: float, authority: str,
                 strip: list[str], failover_headers=()) -> list[pb.ProcessingResponse]:
        """The held answer to the headers, then one answer per body chunk: all emptied but the
        last, which carries the whole rewritten body."""
        rewritten = rewrite_body(body, target)
        response = pb.ProcessingResponse()
        common = response.request_headers.response
        common.header_mutation.CopyFrom(_target_mutation(target))
        common.header_mutation.set_headers.append(_header("content-length", str(len(rewritten.body))))
        if failover_headers and len(rewritten.body) <= FAILOVER_BODY_MAX:  # larger: one attempt (docs/failover.md)
            common.header_mutation.set_headers.extend(failover_headers)
            if strip:  # a client's x-envoy-retry-on and the like: overwritten, not removed
                strip = [name for name in strip if name not in {h.header.key for h in failover_headers}]
        if strip:  # whatever the gateway sets itself is overwritten anyway; the rest goes
            common.header_mutation.remove_headers.extend(
                name for name in strip if name not in _SET_BY_GATEWAY)
        common.clear_route_cache = True
        response.dynamic_metadata.CopyFrom(_target_metadata(target))
        fields = response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.fields
        fields["request_model"].string_value = rewritten.model
        fields["stream"].bool_value = rewritten.stream
        fields["started"].number_value = started
        fields["host"].string_value = authority
        last = pb.ProcessingResponse()
        last.request_body.response.body_mutation.body = rewritten.body
        return [response, *([_EMPTIED_CHUNK] * (chunks - 1)), last]


class Exchange:
    """One ext_proc stream (one HTTP request). The request's messages are answered all at once
    when its body is whole (or at once with an error); an answer's messages each at once. The
    stream ends as soon as nothing more is needed, before Envoy has to cancel it."""

    __slots__ = ("_processor", "_target", "_started", "_authority", "_strip", "_failover", "_body", "_chunks",
                 "_observer")

    def __init__(self, processor: ExternalProcessor):
        self._processor = processor
        self._target: Target | None = None
        self._started = 0.0
        self._authority = ""
        self._strip: list[str] = []
        self._failover: tuple = ()  # a rule with retries: the attempt order's headers
        self._body = bytearray()
        self._chunks = 0
        self._observer: _EventStreamObserver | None = None

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        """The wire form, for the HTTP/2 server."""
        responses, done = self.on_request(pb.ProcessingRequest.FromString(message))
        return [r.SerializeToString() for r in responses], done

    def on_request(self, request: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        """The answers this message completes (none while the request body is incomplete), and
        whether the stream is over."""
        phase = request.WhichOneof("request")
        processor = self._processor
        try:
            if phase == "request_headers":
                self._started = processor._clock()
                self._authority, self._target, self._strip, self._failover = processor._choose(request.request_headers)
                return [], False  # answered with the body
            if phase == "request_body":
                if self._target is None:  # cannot happen with our bootstrap; never forward unrewritten
                    raise GatewayError(500, "request body arrived before its headers", "internal_error")
                chunk = request.request_body
                self._body += chunk.body
                self._chunks += 1
                if len(self._body) > processor._body_limit:
                    raise GatewayError(413, _TOO_LARGE_MESSAGE, _TOO_LARGE_CODE)
                if not chunk.end_of_stream:
                    return [], False
                return processor._forward(bytes(self._body), self._chunks, self._target, self._started,
                                          self._authority, self._strip, self._failover), True
            if phase == "response_headers":
                self._observer = _EventStreamObserver(request.metadata_context, processor._clock)
                return [_CONTINUE_RESPONSE_HEADERS], False
            if phase == "response_body" and self._observer is not None:
                return [self._observer.on_chunk(request.response_body)], request.response_body.end_of_stream
            return [_continue(phase)], False
        except GatewayError as error:
            return [immediate(error)], True
        except Exception:  # never a stack trace to the client, never a request sent unrewritten
            log.exception("ext_proc failed on %s", phase)
            if phase in ("request_headers", "request_body"):
                return [immediate(GatewayError(500, "the gateway failed to process the request", "internal_error"))], True
            return [_continue(phase)], False  # an answer already under way is passed on as it is


class _EventStreamObserver:
    """One server-sent-event answer: chunks pass unchanged; at the end, what was read goes into
    the request's dynamic metadata (response model, tokens, time to first token, time per token)."""

    def __init__(self, metadata: base_pb2.Metadata, clock: Callable[[], float]):
        decision = metadata.filter_metadata.get(METADATA_NAMESPACE)
        self._started = decision.fields["started"].number_value if decision and "started" in decision.fields else None
        self._clock = clock
        self._reader = SSEReader()
        self._first_token_at: float | None = None
        self._last_token_at: float | None = None

    def on_chunk(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        if self._reader.feed(body.body):
            self._token_seen(self._clock())
        response = pb.ProcessingResponse()
        response.response_body.SetInParent()
        if body.end_of_stream:
            response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(self._summary(self._clock()))
        return response

    def _token_seen(self, now: float) -> None:
        if self._first_token_at is None:
            self._first_token_at = now
        self._last_token_at = now

    def _summary(self, ended: float) -> dict:
        before = self._reader.summary.content_events
        s = self._reader.finish()
        if s.content_events > before:  # a last event that had no blank line after it
            self._token_seen(ended)
        out: dict = {}
        if s.model:
            out["response_model"] = s.model
        for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
            if getattr(s, key) is not None:
                out[key] = getattr(s, key)
        if s.error:
            out["stream_error"] = s.error
        first, last = self._first_token_at, self._last_token_at
        if first is not None and self._started is not None:
            out["ttft_ms"] = round((first - self._started) * 1000, 3)
        if first is not None and last is not None and s.completion_tokens and s.completion_tokens > 1:
            out["tpot_ms"] = round((last - first) * 1000 / (s.completion_tokens - 1), 3)
        return out


_CONTINUE_RESPONSE_HEADERS = pb.ProcessingResponse(response_headers=pb.HeadersResponse())


def _continue(phase: str | None) -> pb.ProcessingResponse:
    response = pb.ProcessingResponse()
    if phase in ("response_headers", "response_body", "request_trailers", "response_trailers"):
        getattr(response, phase).SetInParent()
    return response
