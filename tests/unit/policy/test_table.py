"""The routing table: host normalization and aliases, a rule's header matches, rule order,
weighted picks, and the routes a config compiles to."""

from __future__ import annotations

import random

import pytest

from extproc.policy.table import RetryPolicy, Route, Rule, normalize_host
from support.manifests import load_docs, provider, route, rule
from support.table_parts import cond, target, weighted


@pytest.mark.parametrize(("authority", "expected"), [
    pytest.param("api.example.com", "api.example.com", id="plain"),
    pytest.param("api.example.com:443", "api.example.com", id="port-stripped"),
    pytest.param("API.Example.COM", "api.example.com", id="case-folded"),
    pytest.param("api.example.com.", "api.example.com", id="trailing-dot"),
    pytest.param("API.example.com.:8080", "api.example.com", id="trailing-dot-and-port"),
    pytest.param("svc", "svc", id="single-label"),
    pytest.param("svc:80", "svc", id="single-label-with-port"),
    pytest.param("[2001:DB8::1]", "[2001:db8::1]", id="ipv6-literal"),
    pytest.param("[2001:db8::1]:8443", "[2001:db8::1]", id="ipv6-literal-with-port"),
    pytest.param("[::1]:80", "[::1]", id="ipv6-loopback-with-port"),
    pytest.param("127.0.0.1:10000", "127.0.0.1", id="ipv4-with-port"),
    pytest.param("", "", id="empty"),
])
def test_normalize_host(authority, expected):
    assert normalize_host(authority) == expected


@pytest.fixture
def alias_table(tmp_path):
    return load_docs(tmp_path, provider("p", "backend.example.com", model="m-route"),
                     route("chat", "svc", [rule("backend.example.com")], namespace="team")).table


@pytest.mark.parametrize("authority", [
    pytest.param("svc", id="short-name"),
    pytest.param("svc.team", id="name-dot-namespace"),
    pytest.param("svc.team.svc", id="svc-suffix"),
    pytest.param("svc.team.svc.cluster.local", id="cluster-local"),
    pytest.param("SVC.Team.svc.cluster.local.:80", id="cluster-local-case-dot-port"),
    pytest.param("svc:8080", id="short-name-with-port"),
])
def test_host_aliases_resolve_to_the_route(alias_table, authority):
    found = alias_table.route_for(authority)
    assert found is not None and found.name == "team/chat"


@pytest.mark.parametrize("authority", [
    pytest.param("svc.other", id="other-namespace"),
    pytest.param("svc.team.svc.cluster", id="truncated-cluster-domain"),
    pytest.param("svc.default", id="default-namespace"),
    pytest.param("xsvc", id="different-name"),
])
def test_other_names_do_not_resolve_to_the_route(alias_table, authority):
    assert alias_table.route_for(authority) is None


A = cond("a", "exact", "1")
B = cond("b", "exact", "2")


@pytest.mark.parametrize(("matches", "headers", "expected"), [
    pytest.param((), {}, True, id="no-matches-match-everything"),
    pytest.param((), {"a": "x"}, True, id="no-matches-any-headers"),
    pytest.param(((),), {}, True, id="empty-match-entry-matches"),
    pytest.param(((A, B),), {"a": "1", "b": "2"}, True, id="and-both-hold"),
    pytest.param(((A, B),), {"a": "1"}, False, id="and-one-missing"),
    pytest.param(((A, B),), {"a": "1", "b": "3"}, False, id="and-one-wrong"),
    pytest.param(((A,), (B,)), {"b": "2"}, True, id="or-second-entry"),
    pytest.param(((A,), (B,)), {"a": "1"}, True, id="or-first-entry"),
    pytest.param(((A,), (B,)), {"a": "2", "b": "1"}, False, id="or-neither"),
    pytest.param(((A, B), (cond("c", "present"),)), {"c": "x"}, True, id="or-of-ands"),
    pytest.param(((A, B), (cond("c", "present"),)), {"a": "1"}, False, id="or-of-ands-neither"),
])
def test_rule_applies(matches, headers, expected):
    assert Rule("r", matches, (target("t"),), (1,)).applies(headers) is expected


def test_route_select_first_matching_rule_in_order():
    vip = Rule("vip", ((A,),), (target("vip"),), (1,))
    gold = Rule("gold", ((B,),), (target("gold"),), (1,))
    fallback = Rule("fallback", (), (target("fallback"),), (1,))
    ordered = Route("ns/r", (vip, gold, fallback), frozenset({"a", "b"}))
    assert ordered.select({"a": "1", "b": "2"}) is vip
    assert ordered.select({"b": "2"}) is gold
    assert ordered.select({}) is fallback
    fallback_first = Route("ns/r", (fallback, vip), frozenset({"a"}))
    assert fallback_first.select({"a": "1"}) is fallback  # order, not specificity
    assert Route("ns/r", (vip, gold), frozenset({"a", "b"})).select({"a": "9"}) is None


@pytest.mark.parametrize(("weights", "draw", "expected"), [
    pytest.param((50, 50), 0.0, 0, id="50-50-draw-0"),
    pytest.param((50, 50), 0.49, 0, id="50-50-draw-0.49"),
    pytest.param((50, 50), 0.5, 1, id="50-50-draw-0.5"),
    pytest.param((50, 50), 0.99, 1, id="50-50-draw-0.99"),
    pytest.param((1, 3), 0.0, 0, id="1-3-draw-0"),
    pytest.param((1, 3), 0.24, 0, id="1-3-draw-0.24"),
    pytest.param((1, 3), 0.25, 1, id="1-3-draw-0.25"),
    pytest.param((1, 3), 0.99, 1, id="1-3-draw-0.99"),
    pytest.param((1, 1, 2), 0.2, 0, id="1-1-2-draw-0.2"),
    pytest.param((1, 1, 2), 0.3, 1, id="1-1-2-draw-0.3"),
    pytest.param((1, 1, 2), 0.4, 1, id="1-1-2-draw-0.4"),
    pytest.param((1, 1, 2), 0.6, 2, id="1-1-2-draw-0.6"),
    pytest.param((0, 1), 0.0, 1, id="zero-weight-first-never-picked"),
    pytest.param((1, 0), 0.999999, 0, id="zero-weight-last-never-picked"),
    pytest.param((1, 0, 1), 0.5, 2, id="zero-weight-middle-skipped"),
    pytest.param((1,), 0.999, 0, id="single-target"),
    pytest.param((3, 1), 1.0 - 2 ** -53, 1, id="largest-draw-below-one"),
])
def test_rule_pick_deterministic(weights, draw, expected):
    picked = weighted(*weights).pick(draw)
    assert picked.model == f"t{expected}"


@pytest.mark.parametrize(("weights", "expected_share"), [
    pytest.param((50, 50), 0.5, id="50-50"),
    pytest.param((1, 3), 0.25, id="1-3"),
])
def test_rule_pick_statistics(weights, expected_share):
    rng = random.Random(20240601)
    picks = weighted(*weights)
    n = 10_000
    first = sum(picks.pick(rng.random()).model == "t0" for _ in range(n))
    assert abs(first / n - expected_share) <= 0.05


def test_rule_pick_50_50_with_default_random_is_within_45_to_55_percent():
    rule_ = weighted(50, 50)
    n = 10_000
    first = sum(rule_.pick(random.random()).model == "t0" for _ in range(n))
    assert 0.45 * n <= first <= 0.55 * n


def test_provider_exact_host_wins_over_another_providers_namespace_alias(tmp_path):
    from support.manifests import load_docs, provider
    compiled = load_docs(tmp_path, provider("short", "svc", "m-short", namespace="a"),
                         provider("long", "svc.a", "m-long"))
    assert compiled.table.route_for("svc.a").rules[0].targets[0].model == "m-long"
    assert compiled.table.route_for("svc.a.svc").rules[0].targets[0].model == "m-short"
    assert compiled.table.route_for("svc").rules[0].targets[0].model == "m-short"


def test_route_on_provider_host_in_other_namespace_keeps_providers_own_aliases(tmp_path):
    from support.manifests import load_docs, provider, route, rule
    compiled = load_docs(tmp_path, provider("p", "svc", "m-provider", namespace="a"),
                         route("r", "svc", [rule("svc", name="vip")], namespace="b"))
    assert compiled.table.route_for("svc").name == "b/r"
    assert compiled.table.route_for("svc.b").name == "b/r"
    assert compiled.table.route_for("svc.a").name == "a/p"


@pytest.mark.parametrize("retry_on, per_try, expected", [
    (["connect-failure", "reset", "5xx", "429"], 20.0,
     {"x-envoy-max-retries": "2", "x-envoy-retry-on": "connect-failure,reset,5xx,retriable-status-codes",
      "x-envoy-retriable-status-codes": "429", "x-envoy-upstream-rq-per-try-timeout-ms": "20000"}),
    (["5xx"], None, {"x-envoy-max-retries": "2", "x-envoy-retry-on": "5xx"}),
    (["503", "429"], 1.5, {"x-envoy-max-retries": "2", "x-envoy-retry-on": "retriable-status-codes",
                           "x-envoy-retriable-status-codes": "429,503",
                           "x-envoy-upstream-rq-per-try-timeout-ms": "1500"}),
])
def test_retry_headers(retry_on, per_try, expected):
    assert dict(RetryPolicy.from_config(2, per_try, retry_on).envoy_headers()) == expected
