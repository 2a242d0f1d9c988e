"""Envoy's access log, streamed to this process (gRPC access log service): each finished
request becomes metrics (`extproc.telemetry`), is priced (`extproc.policy.pricing`), charges its
budgets, feeds passive health and, where traces are exported, becomes spans.

Envoy batches finished requests into few messages, so this costs no extra round trip per
request; the stream arrives on the lean HTTP/2 server, beside the ext_proc.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from ..policy.budget_gate import BudgetGate
from ..policy.budgets import bucket_id, is_charged, tokens_to_charge
from ..policy.caller import Caller
from ..policy.endpoint_state import EndpointObserver
from ..policy.failover import attempt_target
from ..policy.openai_api import configured_model, endpoint_of_operation
from ..policy.passive_health import AttemptObserver, attempt_reason
from ..policy.pricing import Price, PriceTable, cost_of
from ..policy.table import EMPTY_TABLE, RoutingTable
from ..protocol import METADATA_NAMESPACE, UPSTREAM_END
from ..telemetry.access_entries import metadata_number, record_from_entry, unmetered, unmetered_attempt
from ..telemetry.metrics import GatewayMetrics, RequestRecord
from ..telemetry.spans import SpanSink
from ..telemetry.spend import SpendKey

log = logging.getLogger(__name__)

MAX_PENDING_ATTEMPTS = 10_000  # failed attempts waiting for their request's entry


def caller_label(caller: Caller | None) -> str:
    """Who an Envoy's requests are spent by: a sidecar proven by its ServiceAccount token is its
    workload, `namespace/workload` (the pod's owner, `extproc.policy.caller`), or where its pod's
    workload is not known, `namespace/serviceaccount`; the gateway's own Envoy (local mode, a
    static token) speaks for many callers, which only a budget's key tells apart (see
    `RequestRecord.caller`), unless `--source-namespace` states one."""
    if caller is None or caller.namespace is None:
        return ""
    return spent_by(caller.namespace, caller.workload, caller.name)


def spent_by(namespace: str, workload: str | None, account: str) -> str:
    """`namespace/workload`, or `namespace/serviceaccount` where the workload is not known."""
    return f"{namespace}/{workload}" if workload else f"{namespace}/{account}"


def entry_caller(entry: accesslog_pb2.HTTPAccessLogEntry) -> str:
    """Who an entry's request was decided for, as the ext_proc wrote it into the request's
    metadata (`caller`: the verified caller, `extproc.dataplane.answers.caller_entries`); "" for
    none. Read only from the gateway's own Envoy (see `AccessLogReceiver`)."""
    meta = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    value = meta.fields.get("caller") if meta is not None else None
    if value is None:
        return ""
    fields = value.struct_value.fields
    namespace = fields["namespace"].string_value if "namespace" in fields else ""
    if not namespace:
        return ""
    workload = fields["workload"].string_value if "workload" in fields else ""
    account = fields["service_account"].string_value if "service_account" in fields else ""
    return spent_by(namespace, workload, account)


class AccessLogReceiver:
    """`StreamAccessLogs`: a client stream of batches, one empty answer when Envoy closes it."""

    def __init__(self, metrics: GatewayMetrics, budgets: BudgetGate | None = None,
                 attempts: AttemptObserver | None = None, spans: SpanSink | None = None,
                 prices: Callable[[], PriceTable] | None = None, table: Callable[[], RoutingTable] | None = None,
                 entry_callers: bool = False, endpoints: EndpointObserver | None = None):
        self._metrics = metrics
        # an egress gateway: its own Envoy (a Unix socket, never another's) logs requests of many
        # callers, each decided for the workload its client certificate names: spent by that one
        self._entry_callers = entry_callers
        self._budgets = budgets  # charged from each finished answer
        self._attempts = attempts  # failed attempts and answered requests: passive health
        self._spans = spans  # None: no traces exported, nothing done per entry
        self._table = table if table is not None else (lambda: EMPTY_TABLE)  # the config in force
        # the price tables of the config in force
        self._prices = prices if prices is not None else (lambda: self._table().prices)
        # request id -> provider hosts of its failed attempts that may have been billed (unmetered)
        self._failed_attempts: OrderedDict[str, list[str]] = OrderedDict()
        self._endpoints = endpoints  # the endpoint picker's state, where the config has pools of model servers

    def call(self, caller: Caller | None = None) -> AccessLogStream:
        """A stream from one Envoy; any authenticated Envoy may report usage, spent by its caller
        (its verified identity, never anything an entry says)."""
        return AccessLogStream(self, caller_label(caller))

    def on_message(self, data: bytes, caller: str = "") -> tuple[bytes | None, bool]:
        # a batch's usage summed per currency and set of buckets, charged once: [tokens, cost]
        owed: dict[tuple[str, ...], list[int]] = {}
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
                    elif self._entry_callers and (decided_for := entry_caller(entry)):
                        record.caller = decided_for
                    elif budgets is not None:  # the gateway's own Envoy: a budget's key tells callers apart
                        key = _budget_key(entry)
                        if key:
                            record.caller = f"key:{key}"
                    observe(record)
                    if record.prompt_tokens is None and record.completion_tokens is None and \
                            unmetered(entry, record):  # reached the provider, no usage seen: maybe billed
                        self._metrics.spend.unmetered(_spend_key(record))
                    if self._failed_attempts:  # this request's attempts that failed over unmetered
                        for host in self._failed_attempts.pop(entry.request.request_id, ()):
                            self._metrics.spend.unmetered(self._attempt_key(record, host))
                    if budgets is not None:
                        charge_budgets(owed, entry, record)
                    if spans is not None:
                        spans.request(entry, record)
                else:  # a failed attempt, retried on the next provider
                    if unmetered_attempt(entry, attempt_reason(entry)):  # spent once its request's entry comes
                        self._unmetered_attempt(entry)
                    if spans is not None:
                        spans.attempt(entry)
            except Exception:  # one odd entry must not stop the stream
                log.exception("cannot record an access log entry")
        if budgets is not None:
            charge_owed(budgets, owed)
        return None, False

    def on_client_end(self) -> bytes:
        return als_pb2.StreamAccessLogsResponse().SerializeToString()

    def _unmetered_attempt(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """A failed attempt that may have been billed: its provider host, kept until its request's
        entry (an attempt's own entry carries none of the request's decision; Envoy sends a
        request's attempts just before it, on the same stream)."""
        request_id = entry.request.request_id
        if not request_id:
            return
        host = self._table().cluster_hosts.get(entry.common_properties.upstream_cluster, "")
        self._failed_attempts.setdefault(request_id, []).append(host)
        while len(self._failed_attempts) > MAX_PENDING_ATTEMPTS:
            self._failed_attempts.popitem(last=False)

    def _attempt_key(self, record: RequestRecord, host: str) -> SpendKey:
        """Whom a failed attempt is spent by (its request's caller and route), at which provider
        and model (the target its rule gives that provider host), in that provider's currency
        ("" unpriced)."""
        target = attempt_target(self._table(), record.route, record.rule, host)
        if target is None:  # the config changed meanwhile: the host is what is known
            return record.caller, record.route, host, "", ""
        model = configured_model(endpoint_of_operation(record.operation), target) or record.request_model
        price = target.prices.get(model)
        return record.caller, record.route, target.provider, model, price.currency if price is not None else ""



def price_answer(entry: accesslog_pb2.HTTPAccessLogEntry, record: RequestRecord, price: Price) -> None:
    """The answer's currency and exact cost (pico-units), at the price of the provider and model
    that answered (after a failover: the last attempt's, as the retry processor wrote them), from
    its usage, cached prompt tokens at the cached price. What its cost caps are charged (`charge_budgets`)."""
    record.currency = price.currency
    meta = entry.common_properties.metadata.filter_metadata.get(METADATA_NAMESPACE)
    cached = meta.fields.get("cached_tokens") if meta is not None else None
    if cached is not None:
        record.cached_tokens = int(cached.number_value)
    record.cost = cost_of(price, record.prompt_tokens, record.completion_tokens, record.cached_tokens)


def _spend_key(record: RequestRecord) -> SpendKey:
    return record.caller, record.route, record.provider, record.request_model, record.currency


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


def charge_owed(budgets: BudgetGate, owed: dict[tuple[str, ...], list[int]]) -> None:
    """A batch's charges (`charge_budgets`), each set of buckets charged once per currency."""
    for (currency, *buckets), (tokens, cost) in owed.items():
        budgets.charge(buckets, tokens, cost if currency else None, currency)


def charge_budgets(owed: dict[tuple[str, ...], list[int]], entry: accesslog_pb2.HTTPAccessLogEntry,
                   record: RequestRecord) -> None:
    """A finished answer's usage, owed to the budgets the ext_proc admitted it under: its tokens,
    and its cost (`price_answer`, from the same usage) in its currency ("" unpriced) for cost caps."""
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
    listed = get("budget_buckets")  # several buckets (objects, a cost cap) limit the request; else one
    if listed is not None:
        key = (record.currency, *[v.string_value for v in listed.list_value.values])
    else:
        key = (record.currency,
               bucket_id(budget.string_value, get("budget_rule").string_value, get("budget_key").string_value))
    sums = owed.get(key)
    if sums is None:
        owed[key] = [tokens, record.cost or 0]
    else:
        sums[0] += tokens
        sums[1] += record.cost or 0
