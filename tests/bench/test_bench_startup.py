"""The startup bench part (issue 30) runs, on a few providers: each phase measured in process,
and every start and reload it makes ready and serving (it asserts both itself)."""

from __future__ import annotations

from benchmarks import startup


def test_phases_are_measured():
    figures = startup.phases(20, runs=1)
    assert {"read files (YAML, models)", "compile", "cluster dicts", "clusters to protobuf",
            "CDS response (pack, serialize)", "route configurations (RDS)"} <= set(figures)
    assert all(ms >= 0 for ms in figures.values())


def test_a_short_run(capsys):
    assert startup.main(["--providers", "30", "--small-ca"]) == 0
    out = capsys.readouterr().out
    assert "all resolvable" in out and "3 never answering" in out
    assert "requests to the old provider meanwhile" in out and "failed: 0" in out
