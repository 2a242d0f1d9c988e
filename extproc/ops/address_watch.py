"""The control plane's lookups of provider host names, with the resolver Envoy uses for them:
the system's (`getaddrinfo`) or the one DNS server of `--dns-resolver`. What they find, and
what follows from it, is `extproc.policy.addresses`.

Lookups never wait long: one that has no answer within LOOKUP_TIMEOUT_S counts as no answer
(the name is asked again later), and only so many run at once, so a DNS server that drops
queries is not flooded and names that never answer do not hold up the others for long.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..envoy.addresses import HostPort
from ..policy.addresses import Change, Lookup, ProviderNames, Resolution

log = logging.getLogger(__name__)

LOOKUP_TIMEOUT_S = 3.0
SYSTEM_THREADS = 16  # getaddrinfo blocks a thread per lookup
SERVER_QUERIES = 64  # queries in flight to a --dns-resolver server
SETTLE_S = 0.2  # changes found within this long are handed on together


class SystemResolver:
    """`getaddrinfo`, as Envoy's default resolver (so /etc/hosts counts), in daemon threads: a
    lookup the system resolver keeps retrying never holds up the process's exit."""

    def __init__(self, threads: int = SYSTEM_THREADS, timeout_s: float = LOOKUP_TIMEOUT_S):
        self._timeout_s = timeout_s
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._slots: asyncio.Semaphore | None = None
        self._threads = threads
        self._started = False

    def _start(self) -> None:
        for i in range(self._threads):
            threading.Thread(target=self._work, name=f"dns-lookup-{i}", daemon=True).start()
        self._started = True

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            name, loop, future = job
            result = system_lookup(name)
            try:
                loop.call_soon_threadsafe(_settle, future, result)
            except RuntimeError:  # the loop is closed: nobody waits any more
                return

    async def lookup(self, name: str) -> Lookup:
        if not self._started:
            self._start()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self._threads)
        await self._slots.acquire()  # released when the thread is done, not at the timeout
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Lookup] = loop.create_future()
        future.add_done_callback(lambda _f: self._slots.release() if self._slots else None)
        self._jobs.put((name, loop, future))
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._timeout_s)
        except TimeoutError:
            return Lookup(Resolution.NO_ANSWER, f"none within {self._timeout_s:g} s")

    def close(self) -> None:
        if self._started:
            for _ in range(self._threads):
                self._jobs.put(None)


def _settle(future: asyncio.Future[Lookup], result: Lookup) -> None:
    if not future.done():
        future.set_result(result)


def system_lookup(name: str) -> Lookup:
    """One `getaddrinfo` of `name`, as a Lookup (blocking)."""
    try:
        infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno == socket.EAI_NONAME:
            return Lookup(Resolution.NOT_FOUND)
        if exc.errno == socket.EAI_AGAIN:
            return Lookup(Resolution.NO_ANSWER, str(exc.strerror))
        if exc.errno == getattr(socket, "EAI_NODATA", None):
            return Lookup(Resolution.NO_ADDRESS)
        return Lookup(Resolution.FAILED, str(exc.strerror))
    except (OSError, UnicodeError) as exc:
        return Lookup(Resolution.FAILED, str(exc))
    return _found(sorted({str(info[4][0]) for info in infos}))


def _found(addresses: list[str]) -> Lookup:
    if not addresses:
        return Lookup(Resolution.NO_ADDRESS)
    return Lookup(Resolution.RESOLVED, ", ".join(addresses[:3]) + (" ..." if len(addresses) > 3 else ""))


class ServerResolver:
    """Queries to one DNS server (`--dns-resolver`), as Envoy's c-ares resolver then sends:
    A, then AAAA where there is no A record."""

    def __init__(self, server: HostPort, timeout_s: float = LOOKUP_TIMEOUT_S, queries: int = SERVER_QUERIES):
        import dns.asyncresolver  # dnspython loads only when a DNS server is named (--dns-resolver)

        resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.nameservers = [server.host]
        resolver.port = server.port
        resolver.lifetime = timeout_s
        resolver.timeout = min(1.0, timeout_s)  # per try: a dropped query is sent again
        self._resolver: Any = resolver
        self._queries = queries
        self._slots: asyncio.Semaphore | None = None

    async def lookup(self, name: str) -> Lookup:
        import dns.exception
        import dns.resolver

        if self._slots is None:
            self._slots = asyncio.Semaphore(self._queries)
        async with self._slots:
            try:
                answer = await self._query(name, "A")
                if not answer:
                    answer = await self._query(name, "AAAA")
            except dns.resolver.NXDOMAIN:
                return Lookup(Resolution.NOT_FOUND)
            except dns.resolver.LifetimeTimeout:
                return Lookup(Resolution.NO_ANSWER, f"none within {self._resolver.lifetime:g} s")
            except dns.exception.DNSException as exc:
                return Lookup(Resolution.FAILED, str(exc)[:200])
        return _found(answer)

    async def _query(self, name: str, kind: str) -> list[str]:
        import dns.resolver

        try:
            answer = await self._resolver.resolve(name, kind, search=False)
        except dns.resolver.NoAnswer:
            return []
        return sorted(str(record) for record in answer)

    def close(self) -> None:
        pass


Resolver = SystemResolver | ServerResolver


def resolver_for(server: HostPort | None) -> Resolver:
    return SystemResolver() if server is None else ServerResolver(server)


class AddressWatch:
    """Looks up the watched names when due and hands on what changed (`on_change`, a batch of
    changes found close together)."""

    def __init__(self, resolver: Resolver, names: ProviderNames,
                 on_change: Callable[[list[Change]], Awaitable[None] | None],
                 clock: Callable[[], float] = time.monotonic):
        self.resolver = resolver
        self.names = names
        self._on_change = on_change
        self._clock = clock
        self._wake = asyncio.Event()
        self._lookups: set[asyncio.Task] = set()
        self._changes: list[Change] = []
        self._flush: asyncio.TimerHandle | None = None

    def track(self, providers: dict[str, str]) -> bool:
        """Watch these providers (host -> DNS name). True when the providers whose name does not
        resolve may have changed (one that did not was removed)."""
        changed = self.names.track(providers, self._clock())
        self._wake.set()
        return changed

    async def run(self) -> None:
        try:
            while True:
                self._wake.clear()
                now = self._clock()
                for name in self.names.book.due(now):
                    task = asyncio.create_task(self._look_up(name))
                    self._lookups.add(task)
                    task.add_done_callback(self._lookups.discard)
                due = self.names.book.next_due()
                wait = None if due is None else max(0.0, due - self._clock())
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    pass
        finally:
            for task in list(self._lookups):
                task.cancel()
            if self._flush is not None:
                self._flush.cancel()
            self.resolver.close()

    async def _look_up(self, name: str) -> None:
        try:
            lookup = await self.resolver.lookup(name)
        except Exception as exc:  # never let one lookup end the watch
            lookup = Lookup(Resolution.FAILED, f"{type(exc).__name__}: {exc}"[:200])
        change = self.names.book.record(name, lookup, self._clock())
        self._wake.set()  # it is due again later: the loop's next wake-up may be sooner
        if change is not None:
            self._changes.append(change)
            if self._flush is None:
                self._flush = asyncio.get_running_loop().call_later(SETTLE_S, self._hand_on)

    def _hand_on(self) -> None:
        self._flush = None
        changes, self._changes = self._changes, []
        result = self._on_change(changes)
        if asyncio.iscoroutine(result):
            task = asyncio.ensure_future(result)
            self._lookups.add(task)
            task.add_done_callback(self._lookups.discard)
