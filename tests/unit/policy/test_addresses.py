"""Whether providers' names resolve: when each is asked again, what changes are told, which
providers failover leaves out, the gauge."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from extproc.policy.addresses import AddressBook, AddressGauge, Lookup, ProviderNames, Resolution

OK = Lookup(Resolution.RESOLVED, "10.0.0.1")
NX = Lookup(Resolution.NOT_FOUND)
SILENT = Lookup(Resolution.NO_ANSWER, "none within 3 s")


def test_new_names_are_due_at_once_and_handed_out_once():
    book = AddressBook()
    book.track(["a.test", "B.test"], now=0.0)
    assert sorted(book.due(0.0)) == ["a.test", "b.test"]
    assert book.due(100.0) == []  # being looked up: not handed out again
    book.record("a.test", OK, now=1.0)
    assert book.next_due() == 61.0  # a resolved name: again in a minute
    assert book.due(60.9) == [] and book.due(61.0) == ["a.test"]


@pytest.mark.parametrize(("results", "waits"), [
    pytest.param([NX, NX, NX, NX, NX, NX, NX], [1, 2, 4, 8, 16, 30, 30], id="backs-off-to-30s"),
    pytest.param([NX, NX, OK, NX], [1, 2, 60, 1], id="a-success-starts-over"),
])
def test_a_name_that_does_not_resolve_is_asked_again_soon_then_less_often(results, waits):
    book = AddressBook()
    book.track(["a.test"], now=0.0)
    now = 0.0
    for lookup, wait in zip(results, waits, strict=True):
        assert book.due(now) == ["a.test"]
        book.record("a.test", lookup, now)
        assert book.next_due() == now + wait
        now += wait


def test_changes_are_told_at_the_first_verdict_and_when_it_changes():
    book = AddressBook()
    book.track(["a.test", "b.test"], now=0.0)
    book.due(0.0)
    resolves = book.record("b.test", OK, 0.0)
    assert resolves is not None and resolves.before is None and resolves.lookup == OK  # its first verdict
    first = book.record("a.test", NX, 0.0)
    assert first is not None and first.before is None and first.lookup == NX
    assert book.unknown == {"a.test"}
    book.due(1.0)
    assert book.record("a.test", SILENT, 1.0) is None  # still does not resolve: said once
    book.due(3.0)
    back = book.record("a.test", OK, 3.0)
    assert back is not None and back.lookup.resolved and back.before == SILENT
    assert book.unknown == frozenset()
    book.due(63.0)
    gone = book.record("a.test", NX, 63.0)
    assert gone is not None and gone.before == OK  # stopped resolving: said again


def test_forgotten_names_leave_the_unknown_set_and_late_results_are_dropped():
    book = AddressBook()
    book.track(["a.test", "b.test"], now=0.0)
    book.due(0.0)
    book.record("a.test", NX, 0.0)
    assert book.track(["b.test"], now=1.0) is True  # a.test was unknown
    assert book.unknown == frozenset()
    assert book.record("a.test", NX, 2.0) is None and book.unknown == frozenset()
    assert book.track(["b.test", "c.test"], now=2.0) is False


def test_providers_map_to_the_names_envoy_resolves():
    names = ProviderNames(AddressBook())
    names.track({"a.example.com": "a.example.com", "b.example.com": "shared.internal",
                 "c.example.com": "shared.internal"}, now=0.0)
    for name in names.book.due(0.0):
        names.book.record(name, NX if name == "shared.internal" else OK, 0.0)
    assert names.unresolved() == {"b.example.com", "c.example.com"}
    assert names.hosts_of("shared.internal") == ["b.example.com", "c.example.com"]


def test_gauge_shows_looked_up_providers_only():
    names = ProviderNames(AddressBook())
    names.track({"a.test": "a.test", "b.test": "b.test", "c.test": "c.test"}, now=0.0)
    names.book.due(0.0)
    names.book.record("a.test", OK, 0.0)
    names.book.record("b.test", SILENT, 0.0)
    registry = CollectorRegistry()
    registry.register(AddressGauge(names))
    assert registry.get_sample_value("llm_gateway_provider_address_resolved", {"provider": "a.test"}) == 1.0
    assert registry.get_sample_value("llm_gateway_provider_address_resolved", {"provider": "b.test"}) == 0.0
    assert registry.get_sample_value("llm_gateway_provider_address_resolved", {"provider": "c.test"}) is None


def test_lookups_describe_themselves():
    assert NX.describe("a.test") == "a.test does not exist in DNS (NXDOMAIN)"
    assert SILENT.describe("a.test") == "a.test got no answer from the DNS server in time (none within 3 s)"
    assert OK.describe("a.test") == "a.test resolves (10.0.0.1)"
