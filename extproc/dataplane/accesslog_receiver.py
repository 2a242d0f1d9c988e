"""Envoy's access log, streamed to this process (gRPC access log service): each finished
request becomes metrics (`extproc.telemetry`), is priced (`extproc.policy.pricing`), charges its
budgets, feeds passive health and, where traces are exported, becomes spans.

Envoy batches finished requests into few messages, so this costs no extra round trip per
request; the stream arrives on the lean HTTP/2 server, beside the ext_proc.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from ..policy.budget_gate import BudgetGate
from ..policy.budgets import bucket_id, is_charged, tokens_to_charge
from ..policy.caller import Caller
from ..policy.endpoint_state import EndpointObserver
from ..policy.passive_health import AttemptObserver
from ..policy.pricing import EMPTY_PRICES, Price, PriceTable, cost_of
from ..protocol import METADATA_NAMESPACE, UPSTREAM_END
from ..telemetry.access_entries import metadata_number, record_from_entry
from ..telemetry.metrics import GatewayMetrics, RequestRecord
from ..telemetry.spans import SpanSink

log = logging.getLogger(__name__)


def caller_label(caller: Caller | None) -> str:
    """Who an Envoy's requests are spent by: a sidecar proven by its ServiceAccount token is its
    workload, `namespace/workload` (the pod's owner, `extproc.policy.caller`), or where its pod's
    workload is not known, `namespace/serviceaccount`; the gateway's own Envoy (local mode, a
    static token) speaks for many callers, which only a budget's key tells apart (see
    `RequestRecord.caller`), unless `--source-namespace` states one."""
    if caller is None or caller.namespace is None:
        return ""
    if caller.workload:
        return f"{caller.namespace}/{caller.workload}"
    return f"{caller.namespace}/{caller.name}"


class AccessLogReceiver:
    """`StreamAccessLogs`: a client stream of batches, one empty answer when Envoy closes it."""

    def __init__(self, metrics: GatewayMetrics, budgets: BudgetGate | None = None,
                 attempts: AttemptObserver | None = None, spans: SpanSink | None = None,
                 prices: Callable[[], PriceTable] = lambda: EMPTY_PRICES, endpoints: EndpointObserver | None = None):
        self._metrics = metrics
        self._budgets = budgets  # charged from each finished answer
        self._attempts = attempts  # failed attempts and answered requests: passive health
        self._spans = spans  # None: no traces exported, nothing done per entry
        self._prices = prices  # the price tables of the config in force
        self._endpoints = endpoints  # the endpoint picker's state, where the config has pools of model servers

    def call(self, caller: Caller | None = None) -> AccessLogStream:
        """A stream from one Envoy; any authenticated Envoy may report usage, spent by its caller
        (its verified identity, never anything an entry says)."""
        return AccessLogStream(self, caller_label(caller))

    def on_message(self, data: bytes, caller: str = "") -> tuple[bytes | None, bool]:
        owed: dict[tuple[str, ...], int] = {}  # a batch's usage summed per set of buckets, charged once
        budgets = self._budgets if self._budgets is not None and self._budgets.configured() else None
        attempts, observe, spans = self._attempts, self._metrics.observe, self._spans
        priced = self._prices().by_host  # per provider host: its models' prices; empty: nothing is priced
        endpoints = self._endpoints if self._endpoints is not None and self._endpoints.active() else None
        for entry in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry:
            try:
                if attempts is not None:
                    attempts.observe(entry)
                if endpoints is not None:
                    endpoints.observe(entry)
                if entry.common_properties.access_log_type != UPSTREAM_END:  # attempts are not requests
                    record = record_from_entry(entry)
                    if priced:  # the model's price, where it has one: what the answer cost
                        models = priced.get(record.provider_host)
                        price = models.get(record.request_model) if models is not None else None
                        if price is not None:
                            price_answer(entry, record, price)
                    if caller:
                        record.caller = caller
                    elif budgets is not None:  # the gateway's own Envoy: a budget's key tells callers apart
                        key = _budget_key(entry)
                        if key:
                            record.caller = f"key:{key}"
                    observe(record)
                    if budgets is not None:
                        charge_budgets(owed, entry, record)
                    if spans is not None:
                        spans.request(entry, record)
                elif spans is not None:
                    spans.attempt(entry)
            except Exception:  # one odd entry must not stop the stream
                log.exception("cannot record an access log entry")
        if budgets is not None:
            for buckets, tokens in owed.items():
                budgets.charge(buckets, tokens)
        return None, False

    def on_client_end(self) -> bytes:
        return als_pb2.StreamAccessLogsResponse().SerializeToString()



def price_answer(entry: accesslog_pb2.HTTPAccessLogEntry, record: RequestRecord, price: Price) -> None:
    """The answer's currency and exact cost (pico-units), at the price of the provider and model
    that answered (after a failover: the last attempt's, as the retry processor wrote them), from
    its usage, cached prompt tokens at the cached price. Where a cost budget would be charged."""
    record.currency = price.currency
    meta = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    cached = meta.fields.get("cached_tokens") if meta is not None else None
    if cached is not None:
        record.cached_tokens = int(cached.number_value)
    record.cost = cost_of(price, record.prompt_tokens, record.completion_tokens, record.cached_tokens)


def _budget_key(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    meta = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    key = meta.fields.get("budget_key") if meta is not None else None
    return key.string_value if key is not None else ""


class AccessLogStream:
    """One Envoy's access-log stream: its entries are spent by that Envoy's caller."""

    __slots__ = ("_receiver", "_caller")

    def __init__(self, receiver: AccessLogReceiver, caller: str):
        self._receiver, self._caller = receiver, caller

    def on_message(self, data: bytes) -> tuple[bytes | None, bool]:
        return self._receiver.on_message(data, self._caller)

    def on_client_end(self) -> bytes:
        return self._receiver.on_client_end()


def charge_budgets(owed: dict[tuple[str, ...], int], entry: accesslog_pb2.HTTPAccessLogEntry,
                   record: RequestRecord) -> None:
    """A finished answer's usage, owed to the budgets the ext_proc admitted it under."""
    if not is_charged(record.outcome):
        return
    meta = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    if meta is None:
        return
    get = meta.fields.get
    budget = get("budget")
    if budget is None:
        return
    tokens = tokens_to_charge(record.outcome, metadata_number(get("total_tokens")), record.prompt_tokens,
                              record.completion_tokens)
    if not tokens:
        return
    listed = get("budget_buckets")  # several objects limit the request; else one bucket
    if listed is not None:
        buckets = tuple([v.string_value for v in listed.list_value.values])
    else:
        buckets = (bucket_id(budget.string_value, get("budget_rule").string_value, get("budget_key").string_value),)
    owed[buckets] = owed.get(buckets, 0) + tokens
