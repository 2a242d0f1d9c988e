"""The control plane's lookups of provider names, against a real local DNS server (answers,
NXDOMAIN, silence) and the system resolver."""

from __future__ import annotations

import asyncio
import time

import pytest

from extproc.envoy.addresses import HostPort
from extproc.ops.address_watch import AddressWatch, ServerResolver, SystemResolver, system_lookup
from extproc.policy.addresses import AddressBook, ProviderNames, Resolution
from extproc.testing.dns_server import DnsServer


@pytest.fixture
def dns():
    with DnsServer(answers={"up.test": "10.1.2.3"}, silent={"silent.test"}) as server:
        yield server


@pytest.mark.parametrize(("name", "resolution", "detail"), [
    ("up.test", Resolution.RESOLVED, "10.1.2.3"),
    ("UP.test.", Resolution.RESOLVED, "10.1.2.3"),
    ("gone.test", Resolution.NOT_FOUND, ""),
    ("silent.test", Resolution.NO_ANSWER, "none within 0.5 s"),
])
def test_a_dns_server_is_asked(dns, name, resolution, detail):
    resolver = ServerResolver(HostPort("127.0.0.1", dns.port), timeout_s=0.5)
    lookup = asyncio.run(resolver.lookup(name))
    assert (lookup.resolution, lookup.detail) == (resolution, detail)
    assert dns.queries[name.lower().rstrip(".")] >= 1


@pytest.mark.parametrize(("name", "resolution"), [
    ("localhost", Resolution.RESOLVED),  # /etc/hosts counts, as for Envoy's getaddrinfo resolver
    ("no-such-name.invalid", Resolution.NOT_FOUND),
    ("bad..name", Resolution.FAILED),
])
def test_the_system_resolver_is_asked(name, resolution):
    assert system_lookup(name).resolution is resolution
    assert asyncio.run(SystemResolver(threads=2).lookup(name)).resolution is resolution


def test_a_system_lookup_that_hangs_counts_as_no_answer(monkeypatch):
    """getaddrinfo cannot be cancelled: past the timeout the lookup counts as no answer and its
    thread finishes on its own; it holds its slot until then, so lookups never pile up."""
    import extproc.ops.address_watch as watch

    def slow(name):
        if name == "a.test":
            time.sleep(0.6)
        return watch.Lookup(Resolution.RESOLVED, "10.0.0.9")

    monkeypatch.setattr(watch, "system_lookup", slow)

    async def run():
        resolver = SystemResolver(threads=1, timeout_s=0.2)
        first = await resolver.lookup("a.test")
        started = time.monotonic()
        second = await resolver.lookup("b.test")  # waits for the one thread to be free
        return first, second, time.monotonic() - started

    first, second, waited = asyncio.run(run())
    assert first.resolution is Resolution.NO_ANSWER
    assert second.resolution is Resolution.RESOLVED
    assert waited > 0.3  # the slot was held by the first lookup's thread


def test_the_watch_tells_changes_in_batches(dns):
    """Names that do not resolve are told (once), asked again within a second, and told again
    when they start resolving."""
    told: list[list[tuple[str, bool]]] = []
    names = ProviderNames(AddressBook(retry_base_s=0.2, retry_max_s=0.2))

    async def run():
        watch = AddressWatch(ServerResolver(HostPort("127.0.0.1", dns.port), timeout_s=0.3), names,
                             lambda changes: told.append(sorted((c.name, c.lookup.resolved) for c in changes)))
        task = asyncio.create_task(watch.run())
        watch.track({"a.example.com": "up.test", "b.example.com": "gone.test", "c.example.com": "silent.test"})
        for _ in range(100):
            await asyncio.sleep(0.05)
            if names.unresolved() == {"b.example.com", "c.example.com"} and told:
                break
        unresolved_before = names.unresolved()
        dns.answer("gone.test", "10.9.9.9")
        for _ in range(100):
            await asyncio.sleep(0.05)
            if any(("gone.test", True) in batch for batch in told):
                break
        task.cancel()
        return unresolved_before

    assert asyncio.run(run()) == {"b.example.com", "c.example.com"}
    assert names.unresolved() == {"c.example.com"}
    said = [change for batch in told for change in batch]
    assert said.index(("gone.test", False)) < said.index(("gone.test", True))
    assert said.count(("silent.test", False)) == 1  # said once, though asked again
