"""The benches' shared measuring: the round loop's order and what it records around each run, CPU
and RSS read from /proc for a process and its descendants, the best of timed loops."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from benchmarks.contenders import Contender
from benchmarks.measure import Processes, best_us, children, per_us, process_tree
from benchmarks.rounds import cpu_us_per, rotated, run_rounds


def test_each_contender_goes_first_in_turn():
    names = ["bare", "floor", "gateway"]
    assert [rotated(names, r) for r in range(4)] == [
        ["bare", "floor", "gateway"], ["floor", "gateway", "bare"], ["gateway", "bare", "floor"],
        ["bare", "floor", "gateway"]]


def test_rounds_run_every_pass_and_contender_and_record_cpu(capsys):
    me = Processes.of(os.getpid(), descendants=False)
    contenders = {n: Contender(n, 0, {"all": me}) for n in ("a", "b")}
    calls = []

    def run(c: Contender, connections: int) -> dict:
        calls.append((c.name, connections))
        sum(range(200_000))  # some CPU
        return {"requests": 10}

    runs = run_rounds(contenders, 2, run, passes=(1, 16), repeats=2,
                      line=lambda r, c, p, done: f"round {r} {c.name} c={p}: {len(done)} runs")
    assert calls == [("a", 1)] * 2 + [("b", 1)] * 2 + [("a", 16)] * 2 + [("b", 16)] * 2 + \
                    [("b", 1)] * 2 + [("a", 1)] * 2 + [("b", 16)] * 2 + [("a", 16)] * 2
    assert {len(done) for by_pass in runs.values() for done in by_pass.values()} == {4}
    assert all(r["cpu_s"]["all"] >= 0 for by_pass in runs.values() for done in by_pass.values() for r in done)
    assert capsys.readouterr().out.splitlines()[:2] == ["round 1 a c=1: 2 runs", "round 1 b c=1: 2 runs"]
    assert cpu_us_per([{"cpu_s": {"all": 0.5}, "requests": 1000}, {"cpu_s": {"all": 0.5}, "requests": 1000}],
                      "all") == pytest.approx(500.0)


def test_a_process_tree_is_read_with_its_descendants():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert child.pid in children(os.getpid())
        assert process_tree(os.getpid())[0] == os.getpid() and child.pid in process_tree(os.getpid())
        alone, tree = Processes.of(os.getpid(), descendants=False), Processes.of(os.getpid())
        assert tree.rss_kib() > alone.rss_kib() > 0
        assert tree.cpu_seconds() >= alone.cpu_seconds() > 0
    finally:
        child.kill()
        child.wait()
    assert Processes.of(child.pid).cpu_seconds() == 0  # gone: counts for nothing


def test_the_best_of_timed_loops_is_per_item():
    assert best_us(lambda: 1000, repeats=3) < 1000  # a thousand items in far less than a millisecond
    assert per_us(2.0, 0) == 2e6 and per_us(1.0, 4) == 250_000
