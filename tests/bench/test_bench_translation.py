"""The translation bench (issue 27) runs: every pair of client and provider API streams through a
real gateway, each client receiving every content event, and CPU per event is given for Envoy and
the ext_proc (a short smoke run: the figures themselves are not asserted)."""

from __future__ import annotations

from benchmarks import translation


def test_the_translation_bench_runs_every_pair():
    results = translation.benchmark(streams=2, words=20, rounds=1)
    assert list(results) == [translation.label(pair) for pair in translation.PAIRS]
    for name, found in results.items():
        assert found["events"] == 2 * 20, name  # every content event reached the client, in its own API
        assert {"all_us", "ext_proc_us", "envoy_us"} <= set(found)
        assert found["all_us"] >= 0 and found["ext_proc_us"] >= 0
    assert "openai -> openai" in translation.table(results)
