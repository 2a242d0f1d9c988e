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
process drains at once (extproc.drain). Workers die with the main process (PR_SET_PDEATHSIG).

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
from dataclasses import dataclass
from typing import Any

from .server import TableHolder

log = logging.getLogger("extproc.workers")

REPLY_TIMEOUT_S = 5.0


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
class _Worker:
    process: Any
    conn: Any


class BroadcastingHolder(TableHolder):
    """The main process's routing table; setting it hands it to every worker first."""

    def __init__(self, table):
        self._table = table
        self.pool: WorkerPool | None = None

    @property
    def table(self):
        return self._table

    @table.setter
    def table(self, new) -> None:
        if self.pool is not None:
            self.pool.broadcast(new)
        self._table = new


class WorkerPool:
    """The workers, and the questions the main process asks them over their pipes. Questions
    come from two threads (the event loop hands over tables, the `/metrics` thread asks for
    samples): one at a time, each numbered, so a reply always belongs to its own question."""

    def __init__(self, workers: list[_Worker], reply_timeout_s: float = REPLY_TIMEOUT_S):
        self._workers = workers
        self._reply_timeout_s = reply_timeout_s
        self._lock = threading.Lock()  # a pipe is one conversation: one question and its replies
        self._asked = 0

    @classmethod
    def start(cls, count: int, host: str, port: int, table, body_limit: int, cap_share: int,
              log_level: str, auth: tuple[str, str] | None = None,
              redis: tuple[str | None, bool] = (None, False)) -> "WorkerPool":
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no copied loop or threads
        workers = []
        for index in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=_worker_main, name=f"extproc-worker-{index + 1}", daemon=True,
                                      args=(theirs, os.getpid(), host, port, pickle.dumps(table), body_limit,
                                            cap_share, log_level, index + 1, auth, redis))
            process.start()
            theirs.close()
            workers.append(_Worker(process, ours))
        pool = cls(workers)
        for w in workers:
            reply = pool._reply(w)
            if reply != "ready":
                pool.kill()
                raise OSError(f"a worker could not start: {reply}")
        log.info("ext_proc answered by %d processes on %s:%d (this one and %d worker processes, SO_REUSEPORT)",
                 count + 1, host, port, count)
        return pool

    def _reply(self, worker: _Worker, timeout: float = REPLY_TIMEOUT_S, asked: int | None = None):
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


class MergedRegistry:
    """What `/metrics` shows with workers: this process's samples plus every worker's, summed."""

    def __init__(self, registry, pool: WorkerPool | None = None):
        self._registry = registry
        self.pool = pool  # None until the workers have started

    def collect(self):  # noqa: C901 (one merge)
        from prometheus_client.metrics_core import Metric

        merged: dict[str, Metric] = {}
        sums: dict[str, dict[tuple, list]] = {}
        sources = [_flatten(self._registry.collect()), *(self.pool.families() if self.pool else [])]
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


def _flatten(families) -> list:
    return [(f.name, f.type, f.documentation, [(s.name, dict(s.labels), s.value) for s in f.samples])
            for f in families]


class _WorkerControl:
    """What `extproc.drain.drain` needs of a control plane, in a worker."""

    def __init__(self, inflight):
        self.draining = False
        self.inflight = inflight
        self.connections: set = set()
        self._ext_proc_server = None
        self._server = None


def _worker_main(conn, parent: int, host: str, port: int, table: bytes, body_limit: int, cap: int,
                 log_level: str, index: int, auth: tuple[str, str] | None = None,
                 redis: tuple[str | None, bool] = (None, False)) -> None:
    from .lifecycle import die_with_parent

    arm = die_with_parent(signal.SIGTERM, parent)
    if arm is not None:
        arm()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the main process decides
    logging.basicConfig(level=log_level.upper(), format=f"%(asctime)s %(levelname)s %(name)s[worker {index}]: %(message)s")
    from .memory import collect_cycles_rarely, keep_body_buffers

    keep_body_buffers()
    collect_cycles_rarely()
    try:
        asyncio.run(_worker(conn, host, port, pickle.loads(table), body_limit, cap, index, auth, redis))
    except KeyboardInterrupt:
        pass


def _authenticator(auth: tuple[str, str] | None):
    """The same check as the main process's (see `extproc.cli.worker_auth`)."""
    from .auth import StaticToken, TokenReviewAuthenticator, kubernetes_review

    if auth is None:
        return None
    kind, value = auth
    return StaticToken.from_file(value) if kind == "static" else TokenReviewAuthenticator(kubernetes_review(), value)


async def _worker(conn, host: str, port: int, table, body_limit: int, cap: int, index: int,
                  auth: tuple[str, str] | None = None, redis: tuple[str | None, bool] = (None, False)) -> None:
    from .accesslog import STREAM_ACCESS_LOGS, AccessLogReceiver
    from .admission import Inflight, register_metrics
    from .budget_store import BudgetGate
    from .failover import PassiveHealth
    from .failover_log import FailoverObserver
    from .names import RETRY_AUTHORITY
    from .retry_rewrite import RetryRewriter
    from .drain import HEALTH_CHECK, HealthCheck, drain
    from .h2_server import serve as serve_h2
    from .memory import give_back_free_heap
    from .metrics import GatewayMetrics
    from .server import PROCESS, ExternalProcessor

    holder = TableHolder(table)
    inflight = Inflight(cap, give_back_free_heap)
    metrics = GatewayMetrics()
    register_metrics(metrics.registry, inflight, str(index))
    control = _WorkerControl(inflight)
    # budgets: through the same Redis as the main process (without one, each process keeps its own)
    budgets = BudgetGate(metrics.registry, lambda: holder.table, redis[0], redis[1])
    await budgets.start()
    # failover: passive health as this process sees it (as every replica's own)
    health = PassiveHealth()
    health.configure(table.health)
    failover = FailoverObserver(health, metrics.registry,
                                hosts=lambda: holder.table.cluster_hosts)
    methods = {PROCESS: ExternalProcessor(holder, body_limit=body_limit, budgets=budgets, inflight=inflight,
                                          health=health).exchange,
               RETRY_AUTHORITY + PROCESS: lambda *_: RetryRewriter(holder, body_limit).exchange(),
               STREAM_ACCESS_LOGS: AccessLogReceiver(metrics, budgets, failover).call,
               HEALTH_CHECK: lambda *_: HealthCheck(lambda: not control.draining)}
    try:
        control._ext_proc_server = await serve_h2(host, port, methods, body_limit + (4 << 20), _authenticator(auth),
                                                  control.connections, reuse_port=True)
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
            holder.table = pickle.loads(rest[0])
            health.configure(holder.table.health)
            conn.send((asked, "switched"))
        elif kind == "metrics":
            conn.send((asked, _flatten(metrics.registry.collect())))
        elif kind == "drain":
            grace.append(rest[0])
            stop.set()

    loop.add_reader(conn.fileno(), on_message)
    await stop.wait()
    if grace:
        await drain(control, grace[0])
    control._ext_proc_server.close()
    await budgets.stop()


class WorkerSetup:
    """The plumbing `serve` needs: made before the control plane starts (the cap's share, the
    shared port, the broadcasting table), started once the ext_proc port is known."""

    def __init__(self, control, requested: int | None, cap: int, body_limit: int, log_level: str,
                 auth: tuple[str, str] | None = None, redis: tuple[str | None, bool] = (None, False)):
        self.count, share, note = plan(requested, cap, body_limit)
        self._auth, self._redis = auth, redis
        self.pool: WorkerPool | None = None
        self._control, self._body_limit, self._log_level = control, body_limit, log_level
        self._share = share
        self.registry = control.metrics.registry
        if note:
            log.warning("%s", note)
        if self.count > 1:
            control.inflight.cap = share
            control.reuse_port = True
            control.holder = BroadcastingHolder(control.holder.table)
            self.registry = MergedRegistry(control.metrics.registry)

    async def start(self, host: str) -> None:
        if self.count <= 1:
            return
        control = self._control
        self.pool = await asyncio.to_thread(WorkerPool.start, self.count - 1, host, control.ext_proc_port,
                                            control.holder.table, self._body_limit, self._share, self._log_level,
                                            self._auth, self._redis)
        control.holder.pool = self.pool
        self.registry.pool = self.pool

    async def drain(self, grace_s: float) -> None:
        if self.pool is not None:
            await self.pool.drain(grace_s)
