"""Envoy's access log, streamed to this process (gRPC access log service): each finished
request becomes metrics (`extproc.telemetry`), charges its budgets, and feeds passive health.

Each stream comes from one authenticated Envoy: its verified caller (a sidecar's pod, or the
caller local mode states) is who made the requests it logs, so the per-caller metrics are
counted by the stream's caller, never by anything in the entries.

Envoy batches finished requests into few messages, so this costs no extra round trip per
request; the stream arrives on the lean HTTP/2 server, beside the ext_proc.
"""

from __future__ import annotations

import logging

from envoy.data.accesslog.v3 import accesslog_pb2
from envoy.service.accesslog.v3 import als_pb2

from ..policy.budget_gate import BudgetGate
from ..policy.budgets import bucket_id, is_charged, tokens_to_charge
from ..policy.caller import Caller
from ..policy.passive_health import AttemptObserver
from ..protocol import METADATA_NAMESPACE, UPSTREAM_END
from ..telemetry.access_entries import metadata_number, record_from_entry
from ..telemetry.metrics import GatewayMetrics, RequestRecord

log = logging.getLogger(__name__)


class AccessLogReceiver:
    """`StreamAccessLogs`: a client stream of batches, one empty answer when Envoy closes it."""

    def __init__(self, metrics: GatewayMetrics, budgets: BudgetGate | None = None,
                 attempts: AttemptObserver | None = None):
        self._metrics = metrics
        self._budgets = budgets  # charged from each finished answer
        self._attempts = attempts  # failed attempts and answered requests: passive health

    def call(self, caller: Caller | None = None) -> AccessLogReceiver | CallerLogStream:
        """A stream's handler: this receiver, or for a caller with a namespace or workload, one
        that counts its requests under that caller."""
        if caller is None or not (caller.namespace or caller.workload):
            return self
        return CallerLogStream(self, caller.namespace or "", caller.workload or "")

    def on_message(self, data: bytes, caller: tuple[str, str] | None = None) -> tuple[bytes | None, bool]:
        owed: dict[tuple[str, ...], int] = {}  # a batch's usage summed per set of buckets, charged once
        budgets = self._budgets if self._budgets is not None and self._budgets.configured() else None
        attempts, observe = self._attempts, self._metrics.observe
        for entry in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry:
            try:
                if attempts is not None:
                    attempts.observe(entry)
                if entry.common_properties.access_log_type != UPSTREAM_END:  # attempts are not requests
                    record = record_from_entry(entry)
                    if caller is not None:
                        record.caller_namespace, record.caller_workload = caller
                    observe(record)
                    if budgets is not None:
                        charge_budgets(owed, entry, record)
            except Exception:  # one odd entry must not stop the stream
                log.exception("cannot record an access log entry")
        if budgets is not None:
            for buckets, tokens in owed.items():
                budgets.charge(buckets, tokens)
        return None, False

    def on_client_end(self) -> bytes:
        return als_pb2.StreamAccessLogsResponse().SerializeToString()


class CallerLogStream:
    """One Envoy's access-log stream, its requests counted under its verified caller."""

    __slots__ = ("_receiver", "_caller")

    def __init__(self, receiver: AccessLogReceiver, namespace: str, workload: str):
        self._receiver = receiver
        self._caller = (namespace, workload)

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
