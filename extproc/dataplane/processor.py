"""The ext_proc service: Envoy's messages in, the decision's mutations out.

Per request Envoy sends the request headers and, without waiting for their answer, the body
in chunks (usually one). The request is decided from the headers (`extproc.policy.decide`,
the one decision function), or answered with an error at once; the answer to the headers is
held until the body is whole, so that one round trip carries everything: the headers' answer
(every header mutation routing needs, the rewritten body's length, the decision as dynamic
metadata for the access log) and the chunks' answers (the rewritten body in the last one). What
does not depend on the request is prebuilt per target, once (`extproc.dataplane.answers`).

A rule of a data policy with a judge (`LLMDataPolicy`: a private model asked whether the prompt
is sensitive) makes the body's answer wait for the judge (`extproc.dataplane.judge_client`,
bounded by its timeout): the messages are answered later (`extproc.dataplane.deferred`), as for
a budget decided by Redis.

Answers do not come here: Envoy reads their model, usage and error events itself
(json_to_metadata, sse_to_metadata; see `extproc.envoy.bootstrap`). Only a request whose
provider may answer in another format than its client asked for, or whose client or provider
speaks another API than OpenAI's (`extproc.policy.answer_format`; docs/translation.md), or whose
answer a data policy checks (`responses.check`), is marked for Envoy's answer filter, whose own
stream brings the answer to `extproc.dataplane.answer_exchange`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import orjson
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from prometheus_client import CollectorRegistry

from .. import protobuf_wire as wire
from ..errors import GatewayError, too_large_message
from ..policy.answer_format import answer_plan, per_attempt
from ..policy.body_memory import Inflight, Overloaded
from ..policy.budget_gate import Admitted, BudgetGate, Waiting
from ..policy.budgets import unpriced_under_cap
from ..policy.caller import LOCAL, Caller
from ..policy.data_protection.judge import Judgement
from ..policy.decide import Decision, ModelList, decide, pick_endpoints
from ..policy.endpoint_state import EndpointState
from ..policy.failover import FAILOVER_BODY_MAX
from ..policy.passive_health import PassiveHealth
from ..policy.table import TableHolder
from ..protocol import DEFAULT_BODY_LIMIT, METADATA_NAMESPACE, endpoint_header
from ..telemetry.trace_context import TRACEPARENT, Sampler, TraceContext
from . import answers
from .body_rewrite import Rewritten, rewrite_body
from .data_protection import Judging, PromptCheck, ProtectionMetrics
from .deferred import Deferred
from .headers_only import headers_only_answer
from .judge_client import JudgeClient
from .peer_callers import PeerCallers
from .trace_contents import TraceContents

log = logging.getLogger(__name__)


class ExternalProcessor:
    """The ext_proc service. `exchange()` makes the state of one stream, which the lean HTTP/2
    server (`extproc.dataplane.grpc_h2`) drives message by message."""

    def __init__(self, holder: TableHolder, draw: Callable[[], float] = random.random,
                 clock: Callable[[], float] = time.time, body_limit: int = DEFAULT_BODY_LIMIT,
                 budgets: BudgetGate | None = None, inflight: Inflight | None = None,
                 health: PassiveHealth | None = None, tracing: Sampler | None = None,
                 protection: ProtectionMetrics | None = None, contents: TraceContents | None = None,
                 judges: JudgeClient | None = None, peers: PeerCallers | None = None,
                 endpoints: EndpointState | None = None, headers_only: bool = False):
        self.holder = holder
        # issue 32's experiment (extproc.dataplane.headers_only): Envoy sends no body, every request
        # is answered at its headers; off unless switched on, and then one attribute read per request
        self.headers_only = headers_only
        # an egress gateway with mutual TLS: each request's caller is the workload its client
        # certificate names (None: the stream's caller, as everywhere else; nothing done per request)
        self.peers = peers
        self.tracing = tracing  # None: no traces (no exporter configured), nothing done per request
        self.contents = contents  # None: no prompt in spans (the default); else a sampled request's, masked
        self.budgets = budgets  # token/request budgets (extproc.policy.budget_gate)
        self.draw = draw
        self.clock = clock
        self.body_limit = body_limit
        self.inflight = inflight or Inflight()
        self.health = health if health is not None else PassiveHealth()
        self._cooling = lambda: self.health.cooling(self.clock())
        # LLMDataPolicy's counts (extproc.dataplane.data_protection)
        self.protection = protection if protection is not None else ProtectionMetrics(CollectorRegistry())
        # data policies' judges (None: none can be asked, every judgement is `unavailable`)
        self.judges = judges
        # what the endpoint picker knows of the pools' model servers (extproc.policy.endpoint_state)
        self.endpoints = endpoints if endpoints is not None else EndpointState()

    def exchange(self, caller: Caller | None = LOCAL) -> Exchange:
        """A new stream's state, for a verified caller (the HTTP/2 server never opens an ext_proc
        stream for an unverified one)."""
        if caller is None:
            raise ValueError("an ext_proc stream needs a verified caller")
        return Exchange(self, caller)

    def decide(self, headers_msg: pb.HttpHeaders, caller: Caller) -> Decision | ModelList:
        """The request's decision, from its headers (a name sent twice: the last value, as
        everywhere; read with a comprehension, a µs less than a loop)."""
        raw: dict[str, bytes] = {h.key: h.raw_value for h in headers_msg.headers.headers}
        return decide(self.holder.table, raw, not headers_msg.end_of_stream, caller, self.draw(), self._cooling)

    def forward(self, body: bytes, chunks: int, decision: Decision, budget: Admitted | None = None,
                trace: TraceContext | None = None, caller: Caller = LOCAL,
                judged: PromptCheck | None = None) -> list[bytes]:
        """The held answer to the headers, then one answer per body chunk (the last one with the
        rewritten body). In wire form: the target's prebuilt part and what this request adds.
        Raises `Judging` where a data policy's judge must be asked first; `judged`: its check,
        once the judges answered."""
        target, endpoint = decision.target, decision.endpoint
        client_body: list[bytes] = []  # the client's own body, its prompt masked (a data policy's)
        if decision.guard is None:
            rewritten, protected = rewrite_body(body, target, endpoint), None
        else:  # an LLMDataPolicy applies: the prompt is checked (refused, masked, counted) first
            rewritten, protected = self._protected(body, decision, judged, client_body)
        if budget is not None and budget.currencies:  # a cost cap: its answer must have a price to charge
            unpriced = unpriced_under_cap(budget.currencies, target.prices.get(rewritten.model), rewritten.model,
                                          target.provider_host, budget.budget)
            if unpriced is not None:
                raise unpriced
        sent = rewritten.body
        attempt_headers = decision.attempt_headers
        failover, translate = None, False
        if attempt_headers:
            if len(sent) > FAILOVER_BODY_MAX:  # larger: one attempt (docs/failover.md)
                attempt_headers = decision.attempt_headers = ()
            else:
                failover = decision.rule.failover
                # providers of several APIs: each attempt, the first included, translates the client's own body
                translate = failover is not None and per_attempt(endpoint, failover)
                if translate:  # ... as the data policy left it: a masked value never leaves unmasked
                    sent = client_body[0] if client_body else body
        headers_answer, prebuilt = answers.prebuilt(target, endpoint)
        parts = [headers_answer, answers.content_length(len(sent))]
        own = rewritten.own
        if own is not None and not translate:  # a translated request's own path and signature
            parts.append(answers.request_headers(own.path, own.headers))
        more = b""
        table = self.holder.table
        if table.pools and (target.pool is not None or attempt_headers):  # model servers: the endpoint by load
            picked = pick_endpoints(table, decision, self.endpoints, self.clock(), body, rewritten.model)
            if picked:
                parts.append(answers.endpoint_headers(picked))
                more = answers.endpoint_entry(picked[0][1] if picked[0][0] == target.cluster else "")
                if decision.strip:  # a client's value of a header set here is overwritten, not removed
                    ours = {endpoint_header(cluster) for cluster, _ in picked}
                    decision.strip = [name for name in decision.strip if name not in ours]
        # the answer comes back to be turned into the client's format (or API), where a provider may
        # send another, or to be checked by a data policy
        plan = answer_plan(endpoint, target, failover, rewritten.client_stream, rewritten.include_usage,
                           decision.guard is not None and decision.guard.answers is not None)
        if decision.strip or attempt_headers or plan is not None:
            parts.append(answers.more_headers(decision.strip, attempt_headers, plan is not None, translate))
        if target.prices:  # the provider has a price table: the model's price, for the request's cost
            prebuilt = answers.with_price(target, prebuilt, rewritten.model)
        entries, metadata = answers.decision_metadata(prebuilt, rewritten.model, rewritten.stream, decision.authority,
                                                      answers.caller_entries(caller))
        if budget is not None:  # the budget charged, for the access log, and the x-ratelimit-* header values
            more += budget.encoded()
        if trace is not None:  # a sampled request: its provider continues the trace
            header_part, trace_entries = answers.trace_parts(trace)
            parts.append(header_part)
            more += trace_entries
            if self.contents is not None:  # its prompt, masked, for its span
                more += self.contents.prompt_entry(rewritten.body, endpoint, target.route)
        if plan is not None:  # what the client asked for, for its answer and a retry
            more += answers.plan_entries(plan, translate)
            if plan.check:  # and that a data policy checks the answer
                more += answers.CHECK_ENTRY
        if protected:  # a data policy's deciding rule and action
            more += protected
        if more:
            metadata = wire.dynamic_metadata(METADATA_NAMESPACE, entries + more)
        parts.append(metadata)
        return answers.body_answers(parts, chunks, sent)

    def _protected(self, body: bytes, decision: Decision, judged: PromptCheck | None,
                   client_body: list[bytes]) -> tuple[Rewritten, bytes]:
        """The body rewritten once its prompt passed the decision's data policies (refused: the
        refusal is raised; masked in place; counted), and their metadata entries for the access
        log. A judge to ask first: `Judging` is raised (the body is rewritten again once it answered).
        `client_body` gets the client's own body as checked, where a mask changed it (a request
        translated for each attempt sends that, never the unmasked one)."""
        guard, endpoint, protected = decision.guard, decision.endpoint, b""
        assert guard is not None

        def check_prompt(data: dict) -> None:
            nonlocal protected
            if judged is not None:  # the judges answered: the same body, parsed again
                check = judged
                check.rebind(data)
            else:
                check = PromptCheck(guard, endpoint, data)
                pending = check.pending()
                if pending and self.judges is not None:
                    raise Judging(check)
                for rule, _ in pending:  # no client to ask them with: failOpen decides
                    check.judged(rule, Judgement.UNAVAILABLE, self.protection)
            protected = check.finish(self.protection)
            if protected:  # masked, or only counted: the client's body as it now is
                client_body.append(orjson.dumps(data))

        return rewrite_body(body, decision.target, endpoint, inspect=check_prompt), protected


UNAUTHENTICATED_CODE = "caller_unauthenticated"


def peer_caller(peers: PeerCallers, request: pb.ProcessingRequest) -> Caller:
    """The workload a request to an egress gateway comes from, by its client certificate; a 403
    when it names none (Envoy's listener already refuses a connection without one of the mesh's
    certificates: this holds should that ever be configured otherwise)."""
    caller = peers.of(request)
    if caller is None:
        raise GatewayError(403, "this egress gateway serves the mesh's sidecars only: the request came without a "
                                "client certificate naming a workload", UNAUTHENTICATED_CODE, "permission_error")
    return caller


class Exchange:
    """One ext_proc stream (one HTTP request). The request's messages are answered all at once
    when its body is whole (or at once with an error). The stream ends as soon as nothing more
    is needed, before Envoy has to cancel it."""

    __slots__ = ("_processor", "_caller", "_decision", "_body", "_chunks", "_budget", "_held", "_trace", "_later",
                 "_judging")

    def __init__(self, processor: ExternalProcessor, caller: Caller = LOCAL):
        self._processor = processor
        self._caller = caller  # verified (extproc.dataplane.authentication); LOCAL may use everything
        self._held = 0  # body bytes reserved in processor.inflight, given back on close
        inflight = processor.inflight
        inflight.streams += 1
        inflight.opened += 1
        self._decision: Decision | None = None
        self._body = bytearray()
        self._chunks = 0
        self._budget: Admitted | None = None
        self._trace: TraceContext | None = None
        self._judging: asyncio.Task | None = None  # a data policy's judges being asked

    def on_message(self, message: bytes) -> tuple[list[bytes] | Deferred, bool]:
        """The answers this message completes, in wire form (none while the request body is
        incomplete), and whether the stream is over: for the HTTP/2 server. A `Deferred` when the
        request's budget is decided by a Redis round trip first (`extproc.dataplane.deferred`)."""
        return self._answer(pb.ProcessingRequest.FromString(message))

    def on_request(self, request: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse] | Deferred, bool]:
        """The same, as protobuf messages (tests, tools); a `Deferred` is returned as it is."""
        done_answers, done = self._answer(request)
        if isinstance(done_answers, Deferred):
            return done_answers, done
        return [pb.ProcessingResponse.FromString(answer) for answer in done_answers], done

    def _answer(self, request: pb.ProcessingRequest) -> tuple[list[bytes] | Deferred, bool]:
        phase = request.WhichOneof("request")
        processor = self._processor
        try:
            if phase == "request_headers":
                if processor.peers is not None:
                    self._caller = peer_caller(processor.peers, request)
                decided = processor.decide(request.request_headers, self._caller)
                if isinstance(decided, ModelList):
                    return [answers.model_list(decided.route, decided.authority).SerializeToString()], True
                self._decision = decision = decided
                if decision.declared_length and not processor.headers_only:
                    self._admit(decision.declared_length, processor)
                if processor.tracing is not None:
                    self._trace = processor.tracing.start(decision.headers.get(TRACEPARENT))
                if processor.budgets is not None:
                    budget = processor.budgets.admit(decision.target.route, decision.headers, self._caller)
                    if isinstance(budget, Waiting):  # decided by a Redis round trip: answered then
                        return self._wait(budget), False
                    self._budget = budget
                if processor.headers_only:  # no body comes: answered now
                    return [self._headers_only()], True
                return [], False  # answered with the body
            if phase == "request_body":
                held = self._decision
                if held is None:  # cannot happen with our bootstrap; never forward unrewritten
                    raise GatewayError(500, "request body arrived before its headers", "internal_error")
                chunk = request.request_body
                self._body += chunk.body
                self._chunks += 1
                if len(self._body) > processor.body_limit:
                    raise GatewayError(413, too_large_message(processor.body_limit), answers.TOO_LARGE_CODE)
                if len(self._body) > self._held:  # more than declared (or nothing was)
                    self._admit(len(self._body), processor)
                if not chunk.end_of_stream:
                    return [], False
                return processor.forward(bytes(self._body), self._chunks, held, self._budget, self._trace,
                                         self._caller), True
            return [answers.continue_phase(phase).SerializeToString()], False
        except Judging as judging:  # a data policy's judge is asked first: answered then
            return self._judge(judging.check), True
        except GatewayError as error:
            return [self._refusal(error)], True
        except Exception:  # never a stack trace to the client, never a request sent unrewritten
            log.exception("ext_proc failed on %s", phase)
            if phase in ("request_headers", "request_body"):
                return [answers.immediate(GatewayError(500, "the gateway failed to process the request",
                                                       "internal_error")).SerializeToString()], True
            # an answer already under way is passed on as it is
            return [answers.continue_phase(phase).SerializeToString()], False

    def _refusal(self, error: GatewayError) -> bytes:
        """The gateway's own answer to an error, counted under the request's route and endpoint
        once decided (a budget, body memory, the body), else under the operation the error names."""
        held = self._decision
        response = answers.immediate(error, held.endpoint.client_api if held is not None else error.client_api)
        if held is not None:
            answers.with_operation(response, held.endpoint.operation, held.target.route, error.metadata)
        elif error.operation is not None:
            answers.with_operation(response, error.operation)
        return response.SerializeToString()

    def _headers_only(self) -> bytes:
        """The request's whole answer on the headers-only path (issue 32's experiment)."""
        processor, decision = self._processor, self._decision
        assert decision is not None
        return headers_only_answer(processor.holder.table, decision, self._budget, self._trace,
                                   answers.caller_entries(self._caller), processor.contents is not None)

    def _wait(self, waiting: Waiting) -> Deferred:
        """The headers' answer once the budget is decided (the body's messages wait behind it)."""
        self._later = Deferred()
        waiting.then(self._budget_decided)
        return self._later

    def _budget_decided(self, outcome: Admitted | GatewayError | None) -> None:
        """The budget's decision, from the event loop: nothing to answer yet (the body follows), or
        the request's error (429, 503) at once."""
        later = self._later
        try:
            if isinstance(outcome, GatewayError):
                later.answer([self._refusal(outcome)], True)
            else:
                self._budget = outcome
                if self._processor.headers_only:
                    later.answer([self._headers_only()], True)
                else:
                    later.answer([], False)
        except Exception:  # never a stack trace to the client, never a request sent unrewritten
            log.exception("ext_proc failed on the budget's decision")
            later.answer([answers.immediate(GatewayError(500, "the gateway failed to process the request",
                                                         "internal_error")).SerializeToString()], True)

    def _judge(self, check: PromptCheck) -> Deferred:
        """The body's answers once the judges answered (each bounded by its timeout)."""
        later = self._later = Deferred()
        self._judging = asyncio.get_running_loop().create_task(self._judged(check, later))
        return later

    async def _judged(self, check: PromptCheck, later: Deferred) -> None:
        processor = self._processor
        judges, held = processor.judges, self._decision
        assert judges is not None and held is not None
        try:
            pending = check.pending()
            text = check.prompt_text()
            judgements = await asyncio.gather(*(judges.ask(spec, text) for _, spec in pending))
            for (rule, _), judgement in zip(pending, judgements, strict=True):
                check.judged(rule, judgement, processor.protection)
            later.answer(processor.forward(bytes(self._body), self._chunks, held, self._budget, self._trace,
                                           self._caller, judged=check), True)
        except GatewayError as error:
            later.answer([self._refusal(error)], True)
        except Exception:  # never a stack trace to the client, never a request sent unrewritten
            log.exception("ext_proc failed on a data policy's judgement")
            later.answer([answers.immediate(GatewayError(500, "the gateway failed to process the request",
                                                         "internal_error")).SerializeToString()], True)

    def _admit(self, size: int, processor: ExternalProcessor) -> None:
        """Hold `size` body bytes in all (up to the body limit, which answers 413 past it), or 503."""
        more = min(size, processor.body_limit) - self._held
        if more > 0:
            if not processor.inflight.take(more):
                raise Overloaded(size, processor.inflight.cap)
            self._held += more

    def on_close(self) -> None:
        """The stream is over, however it ended: its body bytes are no longer held."""
        inflight = self._processor.inflight
        if self._judging is not None:  # gone while its judges were asked: no one waits for them
            self._judging.cancel()
            self._judging = None
        if self._held >= 0:
            inflight.streams -= 1
            inflight.give_back(self._held)
            self._held = -1
