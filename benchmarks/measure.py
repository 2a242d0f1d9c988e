"""What every bench reads and waits for: CPU time and RSS of processes (from /proc, with their
descendants or without), percentiles, the best of timed loops in process, sequential timed HTTP
requests, free ports, and waiting for a server to answer.

CPU time from /proc over a fixed workload holds up on a shared machine; requests per second do
not. Interference from other processes only ever adds CPU time, so a minimum over runs is a fair
figure too.
"""

from __future__ import annotations

import http.client
import os
import statistics
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


# --- ports and servers ------------------------------------------------------------------------


def wait_http(url: str, timeout: float = 60, process: subprocess.Popen | None = None) -> None:
    """Until `url` answers with anything but a 5xx (or `process` exits: an error)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status < 500:
                    return
        except urllib.error.HTTPError as exc:
            if exc.code < 500:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f}s")


def timed_requests(port: int, host: str, body: bytes, n: int, headers: dict | None = None,
                   first_byte: bool = False) -> list[float]:
    """Sequential requests on one keep-alive connection: ms to the first body byte, or to the end."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        conn.request("POST", "/", body=body,
                     headers={"Host": host, "Content-Type": "application/json", **(headers or {})})
        resp = conn.getresponse()
        if first_byte:
            resp.read1(1)
            times.append((time.perf_counter() - start) * 1000)
            resp.read()
        else:
            resp.read()
            times.append((time.perf_counter() - start) * 1000)
        assert resp.status == 200, resp.status
    conn.close()
    return times


# --- processes, from /proc --------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """A process's direct children (of all its threads)."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def process_tree(pid: int) -> list[int]:
    """A process and its descendants (the gateway's Envoy is a child of `extproc up`, the worker
    processes children of `extproc serve`)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children(p)
    return out


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of one process (its threads, not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def rss_mib(pid: int) -> float:
    return rss_kib(pid) / 1024


@dataclass(frozen=True)
class Processes:
    """Some processes read together: `pids`, with every process below them when `descendants`.
    Processes gone by the time of reading count for nothing."""

    pids: tuple[int, ...]
    descendants: bool = True

    @classmethod
    def of(cls, *pids: int, descendants: bool = True) -> Processes:
        return cls(tuple(pids), descendants)

    def each(self) -> Iterable[int]:
        for root in self.pids:
            yield from process_tree(root) if self.descendants else (root,)

    def cpu_seconds(self) -> float:
        return sum(_or_zero(cpu_seconds, p) for p in self.each())

    def rss_kib(self) -> int:
        return sum(_or_zero(rss_kib, p) for p in self.each())


def _or_zero(read: Callable[[int], float], pid: int) -> float:
    try:
        return read(pid)
    except OSError:
        return 0


def per_us(seconds: float, count: float) -> float:
    """Seconds spent on `count` items, in µs per item (0 items: as if one)."""
    return 1e6 * seconds / max(count, 1)


# --- figures from samples ---------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """The value below which a share `q` of the values lie (nan for no values)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def best_us(run: Callable[[], int], *, seconds: float = 0.0, repeats: int = 1, batch: int = 1,
            clock: Callable[[], float] = time.perf_counter) -> float:
    """The best of several timed loops, in µs per item: `run` does some items and returns how
    many; a loop calls it until `batch` items are done. At least `repeats` loops, and loops until
    `seconds` have passed. `clock`: wall time (perf_counter) or this process's CPU (process_time)."""
    best = float("inf")
    deadline = time.perf_counter() + seconds
    loops = 0
    while True:
        start, done = clock(), 0
        while done < batch:
            done += run()
        best = min(best, (clock() - start) / done * 1e6)
        loops += 1
        if loops >= repeats and time.perf_counter() > deadline:
            return best
