"""Envoy's access log, streamed to this process (gRPC access log service): each finished
request becomes metrics (`extproc.telemetry`), charges its budgets, and feeds passive health.

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

    def call(self, caller: Caller | None = None) -> AccessLogReceiver:
        return self  # no state per stream; any authenticated Envoy may report usage

    def on_message(self, data: bytes) -> tuple[bytes | None, bool]:
        owed: dict[tuple[str, ...], int] = {}  # a batch's usage summed per set of buckets, charged once
        budgets = self._budgets if self._budgets is not None and self._budgets.configured() else None
        attempts, observe = self._attempts, self._metrics.observe
        for entry in als_pb2.StreamAccessLogsMessage.FromString(data).http_logs.log_entry:
            try:
                if attempts is not None:
                    attempts.observe(entry)
                if entry.common_properties.access_log_type != UPSTREAM_END:  # attempts are not requests
                    record = record_from_entry(entry)
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
