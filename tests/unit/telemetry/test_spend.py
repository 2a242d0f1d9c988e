"""The spend ledger: exact sums per currency (never mixed), unpriced counted apart, bounded
labels; the report grouped as asked; spans' queue bounded with drops counted."""

from __future__ import annotations

import threading

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.telemetry.spans import SpanQueue
from extproc.telemetry.spend import MAX_CALLERS, SpendLedger, format_report, spend_report


def ledger() -> tuple[SpendLedger, CollectorRegistry]:
    registry = CollectorRegistry()
    spend = SpendLedger(registry, clock=lambda: 0.0)
    spend.add(("ns/a", "r1", "p1", "m1", "USD"), 100, 10, 5, 1_000_000)  # 0.000001 USD
    spend.add(("ns/a", "r1", "p1", "m1", "USD"), 100, 10, 0, 2_000_000)
    spend.add(("ns/b", "r1", "p2", "m2", "CNY"), 50, 5, 0, 7_000_000_000)  # 0.007 CNY
    spend.add(("ns/b", "r2", "p3", "m3", ""), 40, 4, 0, 0)  # unpriced
    return spend, registry


def test_report_keeps_currencies_apart_and_unpriced_visible():
    _, registry = ledger()
    report = spend_report(registry.collect(), ["caller", "model"], since=0.0)
    assert report["since"] == "1970-01-01T00:00:00Z"
    assert report["totals"] == [{"currency": "CNY", "cost": "0.007"}, {"currency": "USD", "cost": "0.000003"}]
    assert report["unpriced"] == {"requests": 1, "input_tokens": 40, "output_tokens": 4}
    rows = {(r["caller"], r["model"]): r for r in report["rows"]}
    assert rows[("ns/a", "m1")] == {"caller": "ns/a", "model": "m1", "currency": "USD", "requests": 2,
                                    "input_tokens": 200, "output_tokens": 20, "cached_input_tokens": 5,
                                    "cost": "0.000003", "unmetered_attempts": 0}
    assert rows[("ns/b", "m3")]["cost"] is None and rows[("ns/b", "m3")]["currency"] is None
    by_route = spend_report(registry.collect(), ["route"])
    assert [(r["route"], r["currency"], r["requests"]) for r in by_route["rows"]] == [
        ("r2", None, 1), ("r1", "CNY", 1), ("r1", "USD", 2)]  # one row per route and currency
    assert "total USD: 0.000003" in format_report(report) and "unpriced: 1 requests" in format_report(report)


def test_report_refuses_an_unknown_group():
    _, registry = ledger()
    with pytest.raises(ValueError, match="cannot group by user"):
        spend_report(registry.collect(), ["user"])


def test_exposed_as_counters_with_bounded_callers():
    spend, registry = ledger()
    for i in range(MAX_CALLERS + 50):
        spend.add((f"ns/c{i}", "r1", "p1", "m1", "USD"), 1, 1, 0, 1)
    samples = [s for f in text_string_to_metric_families(generate_latest(registry).decode()) for s in f.samples]
    callers = {s.labels["llm_caller"] for s in samples if s.name == "llm_gateway_spend_requests_total"}
    assert len(callers) == MAX_CALLERS + 1 and "other" in callers  # the first ones, then "other"
    other = [s for s in samples if s.name == "llm_gateway_spend_requests_total" and s.labels["llm_caller"] == "other"]
    assert sum(s.value for s in other) == 50 + 2  # nothing lost
    cost = {s.labels["currency"]: s.value for s in samples if s.name == "llm_gateway_cost_total"
            and s.labels["llm_caller"] == "ns/b"}
    assert cost == {"CNY": pytest.approx(0.007)}  # no cost series for the unpriced model


class _Exporter:
    def __init__(self, answer, block: threading.Event | None = None):
        self.answer, self.block, self.batches = answer, block, []

    def export(self, batch):
        if self.block is not None:
            self.block.wait(5)
        self.batches.append(batch)
        return self.answer

    def shutdown(self):
        pass


def _count(registry, result):
    return registry.get_sample_value("llm_gateway_trace_spans_total", {"result": result}) or 0


def test_span_queue_drops_past_its_size_and_counts_what_became_of_each_span():
    from opentelemetry.sdk.trace.export import SpanExportResult

    registry = CollectorRegistry()
    blocked = threading.Event()
    exporter = _Exporter(SpanExportResult.FAILURE, blocked)
    queue = SpanQueue(exporter, registry, max_size=3, batch=1, delay_s=0.01)
    for i in range(10):
        queue.put(f"span-{i}")  # a stuck collector: the thread waits, the queue fills, put never waits
    assert _count(registry, "dropped") >= 6
    blocked.set()
    queue.stop()
    assert _count(registry, "failed") >= 1 and _count(registry, "exported") == 0
    assert _count(registry, "dropped") + _count(registry, "failed") + len(queue._queue) == 10
