"""Worker processes for `serve --workers N`: N processes answer the ext_proc on one TCP port.

One Python process runs on one core at a time, and the ext_proc is the hot path. With workers,
the main process keeps everything that must be one (the config watch, xDS, leader election,
`/metrics`) and answers ext_proc streams too; N-1 worker processes each bind the same ext_proc
port with SO_REUSEPORT, and the kernel spreads Envoy's connections over all N.

The main process hands each worker every new routing table over a pipe and waits for each to
say it switched before the rollout goes on (so no worker routes to a cluster Envoy no longer
has). `/metrics` (served by the main process, from its own thread) asks each worker for its
samples and adds them up: counters, histograms and gauges are sums over the processes. The cap
on body bytes in flight is split evenly: each process holds at most its share. On SIGTERM every
process drains at once (extproc.ops.drain). Workers die with the main process (PR_SET_PDEATHSIG).

SO_REUSEPORT spreads TCP connections; it does nothing for a Unix domain socket, so workers need
a TCP ext_proc address.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import pickle
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from ..dataplane.authentication import AuthSetup
from ..dataplane.judge_client import JudgeReach
from ..policy.table import EMPTY_TABLE, RoutingTable, TableHolder
from .children import die_with_parent
from .data_plane import DataPlane
from .drain import drain
from .malloc import collect_cycles_rarely, keep_body_buffers

log = logging.getLogger(__name__)

REPLY_TIMEOUT_S = 5.0
# A worker's first word: a fresh interpreter imports the package and binds the port. Seconds on
# an idle machine; far more on a loaded one, where giving up would fail the whole `serve`.
START_TIMEOUT_S = 60.0


def default_workers() -> int:
    """The CPU count this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def plan(requested: int | None, cap: int, body_limit: int) -> tuple[int, int, str | None]:
    """Processes, each one's share of the cap, and a note when the default count was lowered so that
    each share still holds the largest body."""
    if requested is not None:
        return requested, cap // requested, None
    n = default_workers()
    fits = max(1, cap // max(body_limit, 1))
    if n > fits:
        return fits, cap // fits, (f"{fits} workers, not {n} (one per CPU): each holds 1/{fits} of "
                                   f"--max-body-bytes-in-flight, which must hold a body of --body-limit")
    return n, cap // n, None


@dataclass
class Worker:
    process: Any
    conn: Any


class BroadcastingHolder(TableHolder):
    """The main process's routing table; setting it hands it to every worker first."""

    def __init__(self, table: RoutingTable):
        self._table = table
        self.pool: WorkerPool | None = None

    @property  # a plain attribute in TableHolder
    def table(self) -> RoutingTable:
        return self._table

    @table.setter
    def table(self, new: RoutingTable) -> None:
        if self.pool is not None:
            self.pool.broadcast(new)
        self._table = new


class WorkerPool:
    """The workers, and the questions the main process asks them over their pipes. Questions
    come from two threads (the event loop hands over tables, the `/metrics` thread asks for
    samples): one at a time, each numbered, so a reply always belongs to its own question."""

    def __init__(self, workers: list[Worker], reply_timeout_s: float = REPLY_TIMEOUT_S):
        self._workers = workers
        self._reply_timeout_s = reply_timeout_s
        self._lock = threading.Lock()  # a pipe is one conversation: one question and its replies
        self._asked = 0

    @classmethod
    def start(cls, count: int, host: str, port: int, table, body_limit: int, cap_share: int,
              log_level: str, auth: AuthSetup | None = None,
              redis: tuple[str | None, bool] = (None, False), otlp_endpoint: str | None = None,
              judges: JudgeReach | None = None) -> WorkerPool:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied loop or threads
        workers = []
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, name=f"extproc-worker-{index + 1}", daemon=True,
                                      args=(theirs, os.getpid(), host, port, pickle.dumps(table), body_limit,
                                            cap_share, log_level, index + 1, auth, redis, otlp_endpoint, judges))
            process.start()
            theirs.close()
            workers.append(Worker(process, ours))
        pool = cls(workers)
        for w in workers:
            reply = pool._reply(w, START_TIMEOUT_S)
            if reply != "ready":
                pool.kill()
                raise OSError(f"a worker could not start: {reply}")
        log.info("ext_proc answered by %d processes on %s:%d (this one and %d worker processes, SO_REUSEPORT)",
                 count + 1, host, port, count)
        return pool

    def _reply(self, worker: Worker, timeout: float = REPLY_TIMEOUT_S, asked: int | None = None):
        """The worker's reply to question `asked` (None: its first word, at start). A reply to an
        earlier question that timed out comes late: it is read and dropped, never taken for this
        question's."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not worker.conn.poll(left):
                return "no answer"
            try:
                reply = worker.conn.recv()
            except (EOFError, OSError):
                return "gone"
            if asked is None:
                return reply
            if isinstance(reply, tuple) and len(reply) == 2 and reply[0] == asked:
                return reply[1]

    def _ask(self, *message) -> list:
        with self._lock:
            self._asked += 1
            for w in self._workers:
                try:
                    w.conn.send((self._asked, *message))
                except OSError:
                    pass
            return [self._reply(w, self._reply_timeout_s, self._asked) for w in self._workers]

    def broadcast(self, table) -> None:
        replies = self._ask("table", pickle.dumps(table))
        if any(r != "switched" for r in replies):
            log.error("a worker did not take the new routing table: %s", replies)

    def families(self) -> list[list]:
        return [r for r in self._ask("metrics") if isinstance(r, list)]

    async def drain(self, grace_s: float) -> None:
        with self._lock:
            for w in self._workers:
                try:
                    w.conn.send((0, "drain", grace_s))  # no reply: the worker drains and exits
                except OSError:
                    pass
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s + 2
        while any(w.process.is_alive() for w in self._workers) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        self.kill()

    def kill(self) -> None:
        for w in self._workers:
            if w.process.is_alive():
                w.process.kill()
            w.process.join(5)


class MergedRegistry(Collector):
    """What `/metrics` shows with workers: this process's samples plus every worker's, summed."""

    def __init__(self, registry, pool: WorkerPool | None = None):
        self._registry = registry
        self.pool = pool  # None until the workers have started

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        sums: dict[str, dict[tuple, list]] = {}
        sources = [flatten_families(self._registry.collect()), *(self.pool.families() if self.pool else [])]
        for families in sources:
            for name, kind, documentation, samples in families:
                if name not in merged:
                    merged[name] = Metric(name, documentation, kind)
                    sums[name] = {}
                for sample_name, labels, value in samples:
                    key = (sample_name, tuple(sorted(labels.items())))
                    if key in sums[name]:
                        sums[name][key][2] += value
                    else:
                        sums[name][key] = [sample_name, labels, value]
        for name, metric in merged.items():
            for sample_name, labels, value in sums[name].values():
                metric.add_sample(sample_name, labels, value)
            yield metric


def flatten_families(families) -> list:
    return [(f.name, f.type, f.documentation, [(s.name, dict(s.labels), s.value) for s in f.samples])
            for f in families]


def _worker_main(conn, parent: int, host: str, port: int, table: bytes, body_limit: int, cap: int,
                 log_level: str, index: int, auth: AuthSetup | None = None,
                 redis: tuple[str | None, bool] = (None, False), otlp_endpoint: str | None = None,
                 judges: JudgeReach | None = None) -> None:
    arm = die_with_parent(signal.SIGTERM, parent)
    if arm is not None:
        arm()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process decides
    logging.basicConfig(level=log_level.upper(),
                        format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    keep_body_buffers()
    collect_cycles_rarely()
    try:
        asyncio.run(_worker(conn, host, port, pickle.loads(table), body_limit, cap, index, auth, redis,
                            otlp_endpoint, judges))
    except KeyboardInterrupt:
        pass


async def _worker(conn, host: str, port: int, table: RoutingTable, body_limit: int, cap: int, index: int,
                  auth: AuthSetup | None = None, redis: tuple[str | None, bool] = (None, False),
                  otlp_endpoint: str | None = None, judges: JudgeReach | None = None) -> None:
    # the same data plane as the main process's (budgets through the same Redis; without one, each
    # process keeps its own; passive health as this process sees it)
    plane = DataPlane(TableHolder(table), body_limit, cap, redis[0], redis[1], worker=index,
                      otlp_endpoint=otlp_endpoint, judges=judges)
    await plane.start()
    try:
        await plane.listen_tcp(host, port, auth.build() if auth else None, reuse_port=True)
    except (OSError, ValueError) as exc:
        conn.send(f"cannot listen on {host}:{port}: {exc}")
        return
    conn.send("ready")
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    grace: list[float] = []

    def on_message() -> None:
        try:
            asked, kind, *rest = conn.recv()
        except (EOFError, OSError):  # the main process is gone
            stop.set()
            loop.remove_reader(conn.fileno())
            return
        if kind == "table":
            plane.switch(pickle.loads(rest[0]))
            conn.send((asked, "switched"))
        elif kind == "metrics":
            conn.send((asked, flatten_families(plane.metrics.registry.collect())))
        elif kind == "drain":
            grace.append(rest[0])
            stop.set()

    loop.add_reader(conn.fileno(), on_message)
    await stop.wait()
    if grace:
        await drain(plane, grace[0])
    await plane.stop()


class WorkerSetup:
    """The plumbing `serve` needs: planned before the data plane is built (how many processes,
    each one's share of the cap on body bytes, the broadcasting table), started once the
    ext_proc port is known."""

    def __init__(self, requested: int | None, cap: int, body_limit: int, log_level: str,
                 auth: AuthSetup | None = None, redis: tuple[str | None, bool] = (None, False),
                 otlp_endpoint: str | None = None, judges: JudgeReach | None = None):
        self.count, self.share, note = plan(requested, cap, body_limit)
        self._auth, self._redis, self._otlp, self._judges = auth, redis, otlp_endpoint, judges
        self.pool: WorkerPool | None = None
        self._body_limit, self._log_level = body_limit, log_level
        if note:
            log.warning("%s", note)
        self.holder: TableHolder = BroadcastingHolder(EMPTY_TABLE) if self.count > 1 else TableHolder(EMPTY_TABLE)
        self._merged: MergedRegistry | None = None

    @property
    def reuse_port(self) -> bool:
        return self.count > 1

    def registry(self, own: CollectorRegistry) -> CollectorRegistry | MergedRegistry:
        """What `/metrics` shows: this process's registry, or with workers every process's, summed."""
        self._merged = MergedRegistry(own) if self.count > 1 else None
        return self._merged or own

    async def start(self, host: str, port: int) -> None:
        if self.count <= 1:
            return
        self.pool = await asyncio.to_thread(WorkerPool.start, self.count - 1, host, port, self.holder.table,
                                            self._body_limit, self.share, self._log_level, self._auth, self._redis,
                                            self._otlp, self._judges)
        assert isinstance(self.holder, BroadcastingHolder)
        self.holder.pool = self.pool
        if self._merged is not None:
            self._merged.pool = self.pool

    async def drain(self, grace_s: float) -> None:
        if self.pool is not None:
            await self.pool.drain(grace_s)
