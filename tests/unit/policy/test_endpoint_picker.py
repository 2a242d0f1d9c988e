"""The endpoint picker: pure scoring over a snapshot of the model servers' loads."""

from __future__ import annotations

import pytest

from extproc.policy.endpoint_picker import PREFIX_BLOCK, Load, PickerSettings, pick, prefix_hashes
from extproc.policy.endpoint_state import EndpointState
from extproc.policy.table import Pool

A, B, C = "10.0.0.1:8000", "10.0.0.2:8000", "10.0.0.3:8000"
NOW = 1000.0


def load(waiting=0.0, running=0.0, kv=0.1, adapters=(), max_adapters=0, at=NOW, sent_before=0) -> Load:
    return Load(waiting, running, kv, frozenset(adapters), max_adapters, at, sent_before)


# (loads, keyword arguments of pick, the best endpoint)
CASES = [
    pytest.param({A: load(waiting=5), B: load(waiting=0), C: load(waiting=2)}, {}, B, id="shortest-queue"),
    pytest.param({A: load(running=4), B: load(running=4, waiting=1), C: load(running=1)}, {}, C,
                 id="running-counts-too"),
    pytest.param({A: load(kv=0.7), B: load(kv=0.2), C: load(kv=0.5)}, {}, B, id="emptiest-kv-cache"),
    pytest.param({A: load(kv=0.95), B: load(kv=0.5, waiting=3), C: load(kv=0.5, waiting=3)}, {}, B,
                 id="a-full-kv-cache-is-overloaded-whatever-its-queue"),
    pytest.param({A: load(), B: load(), C: load()}, {"prefix": {C: 0.8}}, C, id="prefix-affinity"),
    pytest.param({A: load(), B: load(), C: load(waiting=2)}, {"prefix": {C: 0.9}}, C,
                 id="prefix-beats-a-short-queue"),
    pytest.param({A: load(), B: load(), C: load(waiting=20)}, {"prefix": {C: 1.0}}, A,
                 id="no-prefix-affinity-when-overloaded"),
    pytest.param({A: load(adapters={"x"}), B: load(adapters={"sql"}), C: load()}, {"adapter": "sql"}, B,
                 id="lora-held"),
    pytest.param({A: load(adapters={"x", "y"}, max_adapters=2), B: load(adapters={"sql"}, max_adapters=2, waiting=2),
                  C: load(adapters={"z"}, max_adapters=2)}, {"adapter": "sql"}, B, id="lora-held-beats-a-short-queue"),
    pytest.param({A: load(), B: load(), C: load(adapters={"sql"})}, {"adapter": "base"}, A,
                 id="a-base-model-ignores-adapters"),
    pytest.param({A: load(at=NOW - 5), B: load(at=NOW - 5), C: load(at=NOW - 5)},
                 {"outstanding": {A: 3, B: 1, C: 2}}, B, id="all-stale-least-outstanding"),
    pytest.param({}, {"outstanding": {A: 1, B: 0, C: 1}}, B, id="no-metrics-least-outstanding"),
    pytest.param({A: load(at=NOW - 5), B: load(waiting=3), C: load(waiting=4)}, {}, B,
                 id="stale-after-fresh"),
    pytest.param({A: load(), B: load(waiting=1), C: load(waiting=2)}, {"ejected": {A}}, B, id="ejected-left-out"),
    pytest.param({A: load(), B: load(waiting=1), C: load(waiting=2)}, {"ejected": {A, B, C}}, A,
                 id="all-ejected-all-tried"),
    pytest.param({A: load(sent_before=10), B: load(waiting=2, sent_before=0)}, {"sent": {A: 18, B: 0}}, B,
                 id="sent-since-the-scrape-queue-there"),
]


@pytest.mark.parametrize(("loads", "kwargs", "best"), CASES)
def test_pick(loads, kwargs, best):
    outstanding = kwargs.pop("outstanding", {})
    ranking = pick((A, B, C), loads, outstanding, NOW, **kwargs)
    assert ranking.best == best, ranking
    assert sorted(s.endpoint for s in ranking.order) == sorted({A, B, C} - (kwargs.get("ejected") or set())
                                                                or {A, B, C})


def test_ranking_gives_each_attempt_another_endpoint_while_there_are():
    ranking = pick((A, B), {A: load(waiting=1), B: load()}, {}, NOW)
    assert [ranking.endpoint(i) for i in range(3)] == [B, A, A]
    assert pick((), {}, {}, NOW).best is None


def test_equal_scores_spread_by_the_tie_number():
    loads = {A: load(), B: load(), C: load()}
    assert {pick((A, B, C), loads, {}, NOW, tie=t).best for t in range(3)} == {A, B, C}


def test_stale_metrics_are_said():
    ranking = pick((A, B), {A: load(at=NOW - 2)}, {A: 1}, NOW, settings=PickerSettings(stale_s=1.0))
    assert ranking.basis == "least-outstanding" and "metrics stale" in ranking.order[0].why


def test_prefix_hashes_share_their_beginning():
    document = "x" * (PREFIX_BLOCK * 4)
    one = prefix_hashes(b'{"model":"a","messages":[{"role":"user","content":"' + document.encode() + b'one"}]}')
    two = prefix_hashes(b'{"model":"b","messages":[{"role":"user","content":"' + document.encode() + b'two"}]}')
    assert len(one) >= 4 and one[:4] == two[:4]  # the model before the prompt changes nothing
    assert prefix_hashes(b'{"model":"a"}') == ()
    other = prefix_hashes(b'{"messages":[{"role":"user","content":"' + b"y" * PREFIX_BLOCK * 4 + b'"}]}')
    assert not set(other) & set(one)


def test_state_remembers_prefixes_counts_in_flight_and_ejects():
    pool = Pool("p.default.inferencepool", "InferencePool", "default/p", "http", (A, B, C))
    state = EndpointState(eject_after=2, eject_s=30)
    state.keep_only({pool.host: pool})  # as the scraper does when the table changes
    hashes = (1, 2, 3)
    for e in (A, B, C):
        state.loaded(e, load())
    state.sent(pool, B, hashes)
    ranking = state.rank(pool, NOW, (1, 2, 3, 4), None)
    assert ranking.best == B and "prefix=0.75" in ranking.order[0].why
    assert state.outstanding[B] == 1
    state.finished(B)
    state.finished(B)  # never below zero
    assert state.outstanding[B] == 0
    assert not state.failed(A, "503", NOW)
    assert state.failed(A, "connect_failure", NOW)  # the second in a row: ejected
    assert A not in [s.endpoint for s in state.rank(pool, NOW + 1).order]
    assert A in [s.endpoint for s in state.rank(pool, NOW + 31).order]  # back after the ejection
    assert state.failed(A, "503", NOW + 31)  # one more failure ejects it again
    state.succeeded(A)
    assert A in [s.endpoint for s in state.rank(pool, NOW + 32).order]
    assert state.failed_attempts[("default/p", A, "503")] == 2
    state.keep_only({pool.host: Pool(pool.host, pool.kind, pool.name, "http", (B,))})
    assert A not in state.loads and A not in state.outstanding
