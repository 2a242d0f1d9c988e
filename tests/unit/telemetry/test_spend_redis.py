"""Spend kept in a real Redis (a throwaway redis-server per test) by several processes: each
adds what its ledger counted since its last flush, the report adds every instance up, currencies
apart and costs exact past a whole unit; a day's rows are bounded (then `other`), its key
expires; a flush Redis did not take is sent again, never lost; `/spend` answers from Redis, or
from the process, and says clearly when Redis cannot be read."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, date, datetime

import pytest
from prometheus_client import CollectorRegistry

from extproc.envoy.addresses import HostPort
from extproc.ops.status_http import StatusServer
from extproc.telemetry.spend import SpendLedger, format_report
from extproc.telemetry.spend_redis import SpendStore, SpendWriter, day_key, increments, parse_day, row_field


async def fetch(port: int, path: str) -> tuple[int, dict]:
    """GET `path` of the status endpoint: its status and JSON."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


NOON = datetime(2026, 5, 14, 12, tzinfo=UTC).timestamp()
A = ("ns/a", "default/r", "default/dashscope", "qwen-turbo", "CNY")
B = ("ns/b", "default/r", "default/moonshot", "moonshot-v1-8k", "USD")
FREE = ("ns/a", "default/r", "default/dashscope", "text-embedding-v3", "")


def test_increments_are_what_was_counted_since_the_last_flush_with_the_cost_split():
    entries = {A: [3, 30, 40, 5, 2_500_000_000_001, 1], B: [1, 1, 1, 0, 7, 0]}
    assert increments(entries, {}) == [(A, [3, 30, 40, 5, 2, 500_000_000_001, 1]), (B, [1, 1, 1, 0, 0, 7, 0])]
    assert increments(entries, {A: [3, 30, 40, 5, 2_500_000_000_001, 1]}) == [(B, [1, 1, 1, 0, 0, 7, 0])]
    assert increments(entries, {k: list(v) for k, v in entries.items()}) == []


@pytest.mark.parametrize("text, day", [("2026-05-01", date(2026, 5, 1))])
def test_since_is_a_day(text, day):
    assert parse_day(text) == day
    with pytest.raises(ValueError, match="since must be a day"):
        parse_day("yesterday")


def instances(redis_server, count: int = 2) -> tuple[list[SpendLedger], list[SpendWriter]]:
    ledgers = [SpendLedger(CollectorRegistry()) for _ in range(count)]
    writers = [SpendWriter(ledger, redis_server.url, CollectorRegistry(), clock=lambda: NOON) for ledger in ledgers]
    return ledgers, writers


def test_every_instance_adds_up_in_redis_currencies_apart_and_costs_exact(redis_server):
    (one, two), writers = instances(redis_server)
    store = SpendStore(redis_server.url, clock=lambda: NOON)

    async def scenario():
        one.add(A, 8, 9, 3, 600_000_000_000)  # 0.6 CNY
        two.add(A, 8, 9, 0, 700_000_000_000)  # 0.7: the sum passes a whole unit
        two.add(B, 5, 5, 0, 3)  # 3 pico-USD
        two.add(FREE, 3, 0, 0, 0)  # unpriced
        one.unmetered(B)
        assert all([await w.flush() for w in writers])
        one.add(A, 1, 1, 0, 1)  # only what is new goes at the next flush
        assert await writers[0].flush()
        report = await store.report(["model"])
        for w in writers:
            await w.stop()
        await store.close()
        return report

    report = asyncio.run(scenario())
    assert report["source"] == "redis" and report["since"] == "2026-05-14T00:00:00Z"
    assert report["totals"] == [{"currency": "CNY", "cost": "1.300000000001"},
                                {"currency": "USD", "cost": "0.000000000003"}]
    rows = {(r["model"], r["currency"]): r for r in report["rows"]}
    assert rows[("qwen-turbo", "CNY")]["requests"] == 3 and rows[("qwen-turbo", "CNY")]["input_tokens"] == 17
    assert rows[("qwen-turbo", "CNY")]["cached_input_tokens"] == 3
    assert rows[("moonshot-v1-8k", "USD")]["unmetered_attempts"] == 1 and report["unmetered_attempts"] == 1
    assert report["unpriced"] == {"requests": 1, "input_tokens": 3, "output_tokens": 0}
    key = day_key(date(2026, 5, 14))
    value = redis_server.client().hget(key, row_field(A)).decode().split()
    assert value[4:6] == ["1", "300000000001"]  # whole units, and pico-units below one
    assert 30 * 86400 < redis_server.client().ttl(key) <= 31 * 86400  # expires: kept 31 days
    assert "by every instance sharing Redis" in format_report(report)


def test_a_days_rows_are_bounded_then_counted_as_other(redis_server, monkeypatch):
    monkeypatch.setenv("LLM_GATEWAY_SPEND_ROWS", "3")
    (ledger,), (writer,) = instances(redis_server, 1)

    async def scenario():
        for i in range(6):
            ledger.add((f"ns/c{i}", "default/r", "default/dashscope", f"m{i}", "CNY"), 1, 1, 0, 1_000_000)
        assert await writer.flush()
        await writer.stop()
        store = SpendStore(redis_server.url, clock=lambda: NOON)
        report = await store.report(["caller", "model"])
        await store.close()
        return report

    report = asyncio.run(scenario())
    assert redis_server.client().hlen(day_key(date(2026, 5, 14))) == 4  # three rows, and `other`
    other = [r for r in report["rows"] if r["caller"] == "other"]
    assert len(other) == 1 and other[0]["model"] == "other" and other[0]["requests"] == 3  # nothing lost
    assert sum(r["requests"] for r in report["rows"]) == 6 and report["totals"][0]["cost"] == "0.000006"


def test_a_flush_redis_did_not_take_is_sent_again_when_it_is_back(redis_server):
    (ledger,), (writer,) = instances(redis_server, 1)

    async def scenario():
        ledger.add(A, 8, 9, 0, 26_000_000)
        redis_server.kill()
        assert not await writer.flush()
        redis_server.start()
        ledger.add(A, 8, 9, 0, 26_000_000)
        assert await writer.flush()
        await writer.stop()

    asyncio.run(scenario())
    value = redis_server.client().hget(day_key(date(2026, 5, 14)), row_field(A)).decode().split()
    assert value[:3] == ["2", "16", "18"] and value[5] == "52000000"


def test_spend_endpoint_answers_from_redis_or_the_process_and_says_when_redis_is_away(redis_server):
    ledger = SpendLedger(CollectorRegistry())
    writer = SpendWriter(ledger, redis_server.url, CollectorRegistry())  # today, by the clock
    process_registry = CollectorRegistry()
    mine = SpendLedger(process_registry, clock=lambda: 0.0)
    mine.add(B, 1, 2, 0, 5)

    async def scenario():
        ledger.add(A, 8, 9, 0, 26_000_000)
        assert await writer.flush()
        await writer.stop()
        server = StatusServer(process_registry, lambda: True, spend_store=SpendStore(redis_server.url))
        port = await server.start(HostPort("127.0.0.1", 0))
        try:
            answers = {}
            for name, path in (("redis", "/spend?by=model"), ("process", "/spend?by=model&source=process"),
                               ("bad since", "/spend?since=last-week"), ("bad source", "/spend?source=disk"),
                               ("since", f"/spend?by=caller&since={datetime.now(UTC).date().isoformat()}")):
                answers[name] = await fetch(port, path)
            redis_server.kill()
            answers["away"] = await fetch(port, "/spend")
            return answers
        finally:
            await server.stop()

    answers = asyncio.run(scenario())
    status, report = answers["redis"]
    assert status == 200 and report["source"] == "redis" and report["totals"] == [{"currency": "CNY",
                                                                                      "cost": "0.000026"}]
    status, report = answers["process"]
    assert status == 200 and report["source"] == "process" and report["totals"] == [{"currency": "USD",
                                                                                        "cost": "0.000000000005"}]
    assert answers["bad since"][0] == 400 and answers["bad since"][1]["error"]["code"] == "invalid_since"
    assert answers["bad source"][0] == 400 and answers["bad source"][1]["error"]["code"] == "invalid_source"
    assert answers["since"][0] == 200
    status, error = answers["away"]
    assert status == 503 and error["error"]["code"] == "spend_unavailable" and "source=process" in \
        error["error"]["message"]
