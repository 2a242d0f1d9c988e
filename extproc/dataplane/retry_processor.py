"""A retried attempt, rewritten for the provider it goes to (docs/failover.md).

The first attempt is rewritten by the request's own ext_proc exchange
(`extproc.dataplane.processor`), in its one round trip. When Envoy retries, the failover route
sends attempt N to the N-th cluster of the attempt order, and that cluster's upstream ext_proc
(skipped on attempt 1) asks here: the attempt's headers (order, attempt count) and the body the
previous attempt sent come in; that provider's path, host, key, model and stream go out (where
its config sets no `stream`, the client's own: the request's decision carries it whenever a
provider of the order forces another). Only retries pay this round trip, but for a rule whose
providers speak several APIs (docs/translation.md): there the body Envoy holds is the client's
own, and every attempt, the first included, has it translated here for its provider's API (and
signed, for Bedrock). The answer never carries another provider's key: every attempt
sets (or removes) its own (`extproc.dataplane.answers.set_credential`).
"""

from __future__ import annotations

import logging

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..errors import GatewayError
from ..policy.budget_gate import COST_CURRENCY_KEY
from ..policy.budgets import unpriced_under_cap
from ..policy.failover import retry_target, tried_before
from ..policy.openai_api import CHAT, MESSAGES, Endpoint
from ..policy.provider_api import ANTHROPIC, ANTHROPIC_CLIENT_HEADERS, static_path
from ..policy.table import OPENAI_API, RoutingTable, TableHolder, Target
from ..protocol import METADATA_NAMESPACE, ORDER_HEADER, TRANSLATE_HEADER
from ..telemetry.trace_context import TRACEPARENT, attempt_span_id, traceparent
from . import answers
from .body_rewrite import rewrite_body

log = logging.getLogger(__name__)


class RetryRewriter:
    """The upstream ext_proc service for retried attempts: one `RetryExchange` per attempt."""

    def __init__(self, holder: TableHolder, body_limit: int):
        self._holder = holder
        self._body_limit = body_limit

    def exchange(self) -> RetryExchange:
        return RetryExchange(self._holder.table)


class RetryExchange:
    __slots__ = ("_table", "_target", "_tried", "_priced", "_client_stream", "_cost_cap", "_client_endpoint")

    def __init__(self, table: RoutingTable):
        self._table = table
        self._target: Target | None = None
        self._tried = ""
        self._priced = False  # the request carries a price (of an earlier attempt's provider)
        self._cost_cap: tuple[str, str] | None = None  # a cost cap's (currency, budget), where one applies
        self._client_stream: bool | None = None  # what the client asked for, where its answer is processed
        # the body is the client's own, in its API (its endpoint's): translated for each attempt's
        # provider; None: the first attempt's body, in OpenAI's shape (every provider speaks it)
        self._client_endpoint: Endpoint | None = None

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        responses, done = self.on_request(pb.ProcessingRequest.FromString(message))
        return [r.SerializeToString() for r in responses], done

    def on_request(self, request: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        phase = request.WhichOneof("request")
        try:
            if phase == "request_headers":
                return [self._on_headers(request)], False
            if phase == "request_body" and self._target is not None:
                return [self._on_body(request.request_body)], True
            raise GatewayError(500, "the gateway could not prepare a retry", "retry_error")
        except GatewayError as error:  # in the client's API's shape
            endpoint = self._client_endpoint
            return [answers.immediate(error, endpoint.client_api if endpoint is not None else OPENAI_API)], True
        except Exception:  # never an attempt sent with the previous provider's key or model
            log.exception("retry rewrite failed on %s", phase)
            return [answers.immediate(GatewayError(500, "the gateway could not prepare a retry", "retry_error"))], True

    def _on_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        order, attempt = "", 0
        for h in request.request_headers.headers.headers:
            if h.key == ORDER_HEADER:
                order = h.raw_value.decode("latin-1")
            elif h.key == "x-envoy-attempt-count":
                attempt = int(h.raw_value or b"0")
        decision = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        fields = decision.fields if decision is not None else {}
        route = fields["route"].string_value if "route" in fields else ""
        rule = fields["rule"].string_value if "rule" in fields else ""
        self._priced = "currency" in fields
        if COST_CURRENCY_KEY in fields:  # a cost cap: this attempt's model must be priced in its currency
            self._cost_cap = (fields[COST_CURRENCY_KEY].string_value, fields["budget"].string_value
                              if "budget" in fields else "")
        if answers.CLIENT_BODY in fields and fields[answers.CLIENT_BODY].bool_value:
            client_api = fields[answers.CLIENT_API].string_value if answers.CLIENT_API in fields else OPENAI_API
            self._client_endpoint = MESSAGES if client_api == MESSAGES.client_api else CHAT
        target = self._target = retry_target(self._table, route, rule, order, attempt,
                                             first=self._client_endpoint is not None)
        self._tried = tried_before(self._table, route, rule, order, attempt)
        if answers.CLIENT_STREAM in fields:  # the previous attempt's body may hold its provider's `stream`
            self._client_stream = fields[answers.CLIENT_STREAM].bool_value
        response = pb.ProcessingResponse()
        mutation = response.request_headers.response.header_mutation
        # the path is set with the body where it depends on the request (Gemini, Bedrock)
        answers.attempt_mutation(mutation, target, None if self._client_endpoint is not None else target.path)
        mutation.remove_headers.append(TRANSLATE_HEADER)
        if self._client_endpoint is not None and target.api != ANTHROPIC:
            # a client's anthropic-* headers, or an earlier attempt's to an Anthropic provider
            mutation.remove_headers.extend(ANTHROPIC_CLIENT_HEADERS)
        if "span_id" in fields and "trace_id" in fields:  # a sampled request: this attempt's own span
            span = attempt_span_id(fields["span_id"].string_value, attempt)
            mutation.set_headers.append(answers.header(
                TRACEPARENT, traceparent(fields["trace_id"].string_value, span)))
        return response

    def _on_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        target = self._target
        assert target is not None
        endpoint = self._client_endpoint
        if endpoint is not None:  # the client's own body, translated for this provider's API
            rewritten = rewrite_body(body.body, target, endpoint)
        else:
            rewritten = rewrite_body(body.body, target, client_stream=self._client_stream)
        if self._cost_cap is not None:  # never an attempt a cost cap could not charge
            unpriced = unpriced_under_cap((self._cost_cap[0],), target.prices.get(rewritten.model), rewritten.model,
                                          target.provider_host, self._cost_cap[1])
            if unpriced is not None:
                raise unpriced
        response = pb.ProcessingResponse()
        common = response.request_body.response
        common.header_mutation.set_headers.append(answers.header("content-length", str(len(rewritten.body))))
        if endpoint is not None:
            own = rewritten.own
            path = own.path if own is not None and own.path is not None else static_path(endpoint, target)
            if path is not None:
                common.header_mutation.set_headers.append(answers.header(":path", path))
            if own is not None:
                common.header_mutation.set_headers.extend(answers.header(name, value) for name, value in own.headers)
        common.body_mutation.body = rewritten.body
        decided = {"provider": target.provider, "provider_host": target.provider_host,
                   "request_model": rewritten.model, "stream": rewritten.stream, "tried": self._tried,
                   answers.PROVIDER_API: target.body_api}
        if target.prices or self._priced:  # this attempt's price (or none), never the previous provider's
            decided.update(answers.price_values(target.prices.get(rewritten.model)))
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update(decided)
        return response
