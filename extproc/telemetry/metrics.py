"""LLM metrics in Prometheus form, with OpenTelemetry GenAI semantic-convention names.

Every finished request becomes one `RequestRecord` (built from Envoy's access log, see
`extproc.telemetry.access_entries`), and `GatewayMetrics.observe` turns it into histogram and counter
updates. Labels come from the config (routes, rules, providers, configured models) or from a
small bounded set (outcome, error type); a provider-reported model name is capped in count.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import prometheus_client
from prometheus_client import CollectorRegistry

from .fast_series import (  # prometheus-client's families, cheaper to update (see there)
    Counter,
    CounterSeries,
    Histogram,
    HistogramSeries,
)
from .spend import SpendLedger

# `*_created` series double the exposition for no use here.
prometheus_client.disable_created_metrics()

# Bucket boundaries recommended by the GenAI semantic conventions.
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 16777216, 67108864)
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)

MAX_MODEL_LABELS = 200  # distinct values of a label that is not from the config; more are "other"
MAX_BUNDLES = 4096  # cached sets of label values (see GatewayMetrics.observe)


@dataclass(slots=True)  # not frozen: a frozen dataclass costs microseconds per record to build
class RequestRecord:
    route: str = ""
    rule: str = ""
    provider: str = ""
    provider_host: str = ""
    request_model: str = ""
    response_model: str = ""
    stream: bool = False
    status: int = 0
    outcome: str = ""  # success | provider_error | rejected | gateway_error | client_cancelled
    error_type: str = ""
    duration_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None
    tpot_s: float | None = None
    operation: str = "chat"  # gen_ai_operation_name: chat, text_completion, embeddings, models
    cached_tokens: int | None = None  # prompt tokens the provider served from its cache (part of prompt_tokens)
    currency: str = ""  # the price's currency; "" when the model has no price (unpriced)
    budget_key: str = ""  # the hashed key of the budget the request was admitted under
    cost: int | None = None  # pico-units of `currency` (extproc.policy.pricing), set by the receiver
    caller: str = ""  # who: a sidecar's namespace/ServiceAccount, else "key:<budget key>", else ""


_BASE = ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "gen_ai_response_model",
         "llm_route", "llm_rule", "llm_provider")


class GatewayMetrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.token_usage = Histogram("gen_ai_client_token_usage",
                                     "Tokens used per request (GenAI gen_ai.client.token.usage)",
                                     (*_BASE, "gen_ai_token_type"), buckets=TOKEN_BUCKETS, registry=r)
        self.duration = Histogram("gen_ai_server_request_duration_seconds",
                                  "Request duration through the gateway (GenAI gen_ai.server.request.duration)",
                                  (*_BASE, "error_type"), buckets=DURATION_BUCKETS, registry=r)
        self.ttft = Histogram("gen_ai_server_time_to_first_token_seconds",
                              "Time to the first generated token of a streamed answer "
                              "(GenAI gen_ai.server.time_to_first_token)",
                              _BASE, buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("gen_ai_server_time_per_output_token_seconds",
                              "Time per output token after the first, streamed answers "
                              "(GenAI gen_ai.server.time_per_output_token)",
                              _BASE, buckets=TPOT_BUCKETS, registry=r)
        self.requests = Counter("llm_gateway_requests",
                                "Requests by outcome: success, provider_error, rejected, gateway_error, "
                                "client_cancelled",
                                (*_BASE, "outcome", "error_type"), registry=r)
        # values that come from clients or providers, not from the config: capped in number
        self._seen: dict[str, set[str]] = {"request_model": set(), "response_model": set(), "error_type": set()}
        # labelled series, looked up once (`labels()` costs more than an update) and made only when
        # first used, so a request without tokens adds no empty token series
        self._series: dict[tuple[object, tuple[str, ...]], HistogramSeries | CounterSeries] = {}
        # per set of a record's label values: its series, found with one lookup (see `observe`)
        self._bundles: dict[tuple[str, ...], list[Callable[[], Any]]] = {}
        self.spend = SpendLedger(r)  # usage and cost per caller, route, provider, model, currency

    def _capped(self, kind: str, value: str) -> str:
        seen = self._seen[kind]
        if value in seen or not value:
            return value
        if len(seen) >= MAX_MODEL_LABELS:
            return "other"
        seen.add(value)
        return value

    def observe(self, rec: RequestRecord) -> None:
        key = (rec.operation, rec.provider_host, rec.request_model, rec.response_model, rec.route, rec.rule,
               rec.provider, rec.outcome, rec.error_type, rec.caller, rec.currency)
        bundle = self._bundles.get(key)
        if bundle is None:
            if len(self._bundles) >= MAX_BUNDLES:  # label values a client or provider chose: keep it bounded
                self._bundles.clear()
            bundle = self._bundles[key] = self._bundle(rec)
        requests, duration, tokens_in, tokens_out, ttft, tpot, spent = bundle
        requests().inc()
        if rec.duration_s is not None:
            duration().observe(rec.duration_s)
        prompt, completion = rec.prompt_tokens, rec.completion_tokens
        if prompt is not None:
            tokens_in().observe(prompt)
        if completion is not None:
            tokens_out().observe(completion)
        if rec.ttft_s is not None:
            ttft().observe(rec.ttft_s)
        if rec.tpot_s is not None:
            tpot().observe(rec.tpot_s)
        if prompt is not None or completion is not None:  # usage: spent (extproc.telemetry.spend)
            entry = spent()
            entry[0] += 1
            entry[1] += prompt or 0
            entry[2] += completion or 0
            if rec.cached_tokens:
                entry[3] += rec.cached_tokens
            if rec.cost:
                entry[4] += rec.cost

    def _bundle(self, rec: RequestRecord) -> list[Callable[[], Any]]:
        """A record's six series, each made on first use (capped label values decided once)."""
        base = (rec.operation, rec.provider_host, self._capped("request_model", rec.request_model),
                self._capped("response_model", rec.response_model), rec.route, rec.rule, rec.provider)
        error_type = self._capped("error_type", rec.error_type)
        wanted = ((self.requests, (*base, rec.outcome, error_type)), (self.duration, (*base, error_type)),
                  (self.token_usage, (*base, "input")), (self.token_usage, (*base, "output")),
                  (self.ttft, base), (self.tpot, base))
        spend_key = (rec.caller, rec.route, rec.provider, rec.request_model, rec.currency)
        kept: list[list[int]] = []

        def spent() -> list[int]:  # the spend ledger's counts for this record's key, looked up once
            if not kept:
                kept.append(self.spend.entry(spend_key))
            return kept[0]
        return [*(self._lazy(metric, labels) for metric, labels in wanted), spent]

    def _lazy(self, metric: Histogram | Counter, labels: tuple[str, ...]) -> Callable[[], Any]:
        series: list[HistogramSeries | CounterSeries] = []

        def get() -> HistogramSeries | CounterSeries:
            if not series:
                series.append(self._series_of(metric, *labels))
            return series[0]
        return get

    def _series_of(self, metric: Histogram | Counter, *labels: str) -> HistogramSeries | CounterSeries:
        key = (metric, labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*labels)
        return series
