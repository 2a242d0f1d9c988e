"""The round loop every load bench runs: contenders alternate within each round, who goes first
rotating round by round, so drift on a shared machine hits all alike; around each run, the CPU
time of each of the contender's process accounts (see `Contender.processes`), read from /proc.

A run's result is what its runner returned (wrk's figures, the streams' events) with `cpu_s`
added: account name -> CPU seconds during the run. Figures are made from the runs afterwards
(`cpu_us_per`), so a bench picks which runs and which accounts make a figure.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TypeVar

from extproc.testing.load import run_wrk

from .contenders import Contender
from .measure import per_us

P = TypeVar("P", bound=Hashable)
Runs = dict[str, dict[P, list[dict]]]  # contender -> pass -> its runs, in order


def rotated(names: Sequence[str], r: int) -> list[str]:
    """Round r's order: the names rotated by r, so each goes first in turn."""
    k = r % len(names)
    return [*names[k:], *names[:k]]


def run_rounds(contenders: Mapping[str, Contender], rounds: int, run: Callable[[Contender, P], dict],
               passes: Sequence[P] = (None,), repeats: int = 1,
               line: Callable[[int, Contender, P, list[dict]], str] | None = None) -> Runs:
    """`rounds` rounds; in each, every pass (e.g. a number of connections) and in it every contender
    in the round's order, `repeats` runs of `run(contender, pass)` each, CPU measured around each.
    After a contender's runs, `line(round (from 1), contender, pass, its runs so far)` is printed."""
    runs: Runs = {name: {p: [] for p in passes} for name in contenders}
    for r in range(rounds):
        for p in passes:
            for name in rotated(list(contenders), r):
                contender = contenders[name]
                for _ in range(repeats):
                    runs[name][p].append(measured(contender, lambda c=contender, p=p: run(c, p)))
                if line is not None:
                    print(line(r + 1, contender, p, runs[name][p]), flush=True)
    return runs


def measured(contender: Contender, run: Callable[[], dict]) -> dict:
    """`run()`'s result, with the CPU seconds each of the contender's accounts spent during it."""
    before = {a: processes.cpu_seconds() for a, processes in contender.processes.items()}
    result = run()
    result["cpu_s"] = {a: processes.cpu_seconds() - before[a] for a, processes in contender.processes.items()}
    return result


def cpu_us_per(runs: Iterable[dict], account: str, unit: str = "requests") -> float:
    """An account's CPU over some runs, in µs per unit of their work (requests, events)."""
    runs = list(runs)
    return per_us(sum(r["cpu_s"][account] for r in runs), sum(r[unit] for r in runs))


def under_wrk(seconds: float) -> Callable[[Contender, int], dict]:
    """A runner: wrk against the contender with its script, the pass's number of connections."""
    return lambda c, connections: run_wrk(c.port, c.script, connections, seconds)


def warm_up(contenders: Iterable[Contender], seconds: float = 3) -> None:
    """Connections to the provider, caches: a short wrk run on each contender before measuring."""
    for c in contenders:
        run_wrk(c.port, c.script, 4, seconds)
