"""Routing: host normalization and aliases, header matching, rule order, weighted picks, compiled targets."""

from __future__ import annotations

import random
import re

import pytest

from extproc.errors import GatewayError
from extproc.policy.caller import LOCAL
from extproc.policy.decide import Decision, decide
from extproc.policy.matching import HeaderCondition
from extproc.policy.table import Route, RoutingTable, Rule, Target, normalize_host
from extproc.protocol import provider_cluster
from support.manifests import (DASHSCOPE, DASHSCOPE_KEY, MOONSHOT, MOONSHOT_KEY, load_docs, load_seed, provider, route,
                               rule)


def pick(table: RoutingTable, authority: str, headers: dict[str, str], draw: float) -> Target | None:
    """The provider the one decision function picks for a chat request, or None when it
    answers 404 (no route, no rule)."""
    raw = {":authority": authority.encode(), ":method": b"POST", ":path": b"/v1/chat/completions",
           **{k: v.encode() for k, v in headers.items()}}
    try:
        decision = decide(table, raw, True, LOCAL, draw, {})
    except GatewayError as refusal:
        assert refusal.status == 404
        return None
    assert isinstance(decision, Decision)
    return decision.target


def target(name: str) -> Target:
    return Target(route="ns/r", rule="r0", provider=f"ns/{name}", provider_host=f"{name}.example.com",
                  cluster=f"llm_provider_{name}", path="/v1/chat/completions", model=name, stream=None, api_key=None)


def cond(name: str, kind: str, value: str = "") -> HeaderCondition:
    return HeaderCondition(name, kind, value, re.compile(value) if kind == "regex" else None)


def weighted(*weights: int) -> Rule:
    cumulative, running = [], 0
    for w in weights:
        running += w
        cumulative.append(running)
    return Rule("w", (), tuple(target(f"t{i}") for i in range(len(weights))), tuple(cumulative))


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


@pytest.mark.parametrize(("condition", "headers", "expected"), [
    pytest.param(cond("user-type", "exact", "subscriber"), {"user-type": "subscriber"}, True, id="exact-equal"),
    pytest.param(cond("user-type", "exact", "subscriber"), {"user-type": "Subscriber"}, False, id="exact-case-sensitive"),
    pytest.param(cond("user-type", "exact", "subscriber"), {"user-type": "subscriber2"}, False, id="exact-longer"),
    pytest.param(cond("user-type", "exact", "subscriber"), {}, False, id="exact-absent"),
    pytest.param(cond("user-type", "exact", ""), {"user-type": ""}, True, id="exact-empty-value"),
    pytest.param(cond("x-tier", "prefix", "gold"), {"x-tier": "gold-plus"}, True, id="prefix-match"),
    pytest.param(cond("x-tier", "prefix", "gold"), {"x-tier": "gold"}, True, id="prefix-whole"),
    pytest.param(cond("x-tier", "prefix", "gold"), {"x-tier": "rose-gold"}, False, id="prefix-not-at-start"),
    pytest.param(cond("x-tier", "prefix", "gold"), {}, False, id="prefix-absent"),
    pytest.param(cond("x-user", "regex", "vip-[0-9]+"), {"x-user": "vip-42"}, True, id="regex-full-match"),
    pytest.param(cond("x-user", "regex", "vip-[0-9]+"), {"x-user": "vip-42x"}, False, id="regex-trailing-text"),
    pytest.param(cond("x-user", "regex", "vip-[0-9]+"), {"x-user": "a-vip-42"}, False, id="regex-leading-text"),
    pytest.param(cond("x-user", "regex", "vip"), {"x-user": "vip\n"}, False, id="regex-trailing-newline"),
    pytest.param(cond("x-user", "regex", "a|b"), {"x-user": "ab"}, False, id="regex-alternation-whole"),
    pytest.param(cond("x-user", "regex", ".*"), {"x-user": ""}, True, id="regex-empty-value"),
    pytest.param(cond("x-user", "regex", ".*"), {}, False, id="regex-absent"),
    pytest.param(cond("x-debug", "present"), {"x-debug": ""}, True, id="present-empty-value"),
    pytest.param(cond("x-debug", "present"), {"x-debug": "1"}, True, id="present"),
    pytest.param(cond("x-debug", "present"), {"x-other": "1"}, False, id="present-absent"),
])
def test_header_condition(condition, headers, expected):
    assert condition.holds(headers) is expected


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


def test_seed_weighted_route_draws_split_between_providers():
    table = load_seed("01-LLMProvider.yaml", "04-LLMProvider-moonshot.yaml", "06-LLMRoute-weighted.yaml").table
    picks = {draw: pick(table, "demo-llm-server", {}, draw) for draw in (0.0, 0.49, 0.5, 0.99)}
    assert [picks[d].provider_host for d in (0.0, 0.49, 0.5, 0.99)] == [DASHSCOPE, DASHSCOPE, MOONSHOT, MOONSHOT]
    assert picks[0.0].rule == "migrate-rule" and picks[0.0].route == "default/demo-llm-server"
    assert (picks[0.0].model, picks[0.0].api_key) == ("qwen1.5-72b-chat", DASHSCOPE_KEY)
    assert (picks[0.5].model, picks[0.5].api_key, picks[0.5].stream) == ("moonshot-v1-8k", MOONSHOT_KEY, False)
    rng = random.Random(7)
    n = 10_000
    dash = sum(pick(table, "demo-llm-server.default.svc.cluster.local", {}, rng.random()).provider_host == DASHSCOPE
               for _ in range(n))
    assert 0.45 * n <= dash <= 0.55 * n


def test_provider_without_route_gets_default_route():
    table = load_seed("04-LLMProvider-moonshot.yaml").table
    for authority in (MOONSHOT, "API.MOONSHOT.CN:443", f"{MOONSHOT}.default"):
        t = pick(table, authority, {"user-type": "subscriber"}, 0.7)
        assert t is not None, authority
        assert (t.route, t.rule, t.provider) == ("default/moonshot", "default", "default/moonshot")
        assert (t.model, t.api_key, t.stream, t.path) == ("moonshot-v1-8k", MOONSHOT_KEY, False, "/v1/chat/completions")
        assert t.cluster == provider_cluster(MOONSHOT) == "llm_provider_api_moonshot_cn"
    assert table.clusters == {MOONSHOT: "llm_provider_api_moonshot_cn"}


def test_default_route_uses_default_config_not_route_specific():
    table = load_seed("03-LLMProvider-with-route-config.yaml").table  # routeSpecificConfigs but no LLMRoute
    t = pick(table, DASHSCOPE, {"user-type": "subscriber"}, 0.0)
    assert (t.model, t.api_key, t.path) == ("qwen1.5-72b-chat", DASHSCOPE_KEY, "/compatible-mode/v1/chat/completions")


@pytest.mark.parametrize(("headers", "rule_name", "model"), [
    pytest.param({"user-type": "subscriber"}, "vip-route", "qwen-turbo", id="subscriber"),
    pytest.param({}, "rules[1]", "qwen1.5-72b-chat", id="no-header"),
    pytest.param({"user-type": "guest"}, "rules[1]", "qwen1.5-72b-chat", id="other-value"),
    pytest.param({"user-type": "Subscriber"}, "rules[1]", "qwen1.5-72b-chat", id="value-case-sensitive"),
])
def test_scenario_1_route_on_provider_host_takes_over(headers, rule_name, model):
    table = load_seed("01-LLMProvider.yaml", "02-LLMRoute.yaml", "03-LLMProvider-with-route-config.yaml").table
    route_ = table.route_for(DASHSCOPE)
    assert route_.name == "default/dashscope-route"
    assert route_.match_headers == frozenset({"user-type"})
    t = pick(table, DASHSCOPE, headers, 0.0)
    assert (t.route, t.rule, t.model, t.api_key) == ("default/dashscope-route", rule_name, model, DASHSCOPE_KEY)
    assert (t.provider, t.provider_host, t.path) == ("default/dashscope-qwen", DASHSCOPE,
                                                      "/compatible-mode/v1/chat/completions")


def test_scenario_1_without_03_subscriber_gets_default_config():
    table = load_seed("01-LLMProvider.yaml", "02-LLMRoute.yaml").table
    t = pick(table, DASHSCOPE, {"user-type": "subscriber"}, 0.0)
    assert (t.rule, t.model) == ("vip-route", "qwen1.5-72b-chat")


def test_route_on_other_host_does_not_take_over_provider_host(tmp_path):
    table = load_docs(tmp_path, provider("p", "backend.example.com", model="m-default"),
                      route("r", "chat.example.com", [rule("backend.example.com", matches=[{"headers": {"x": {}}}])])).table
    assert table.route_for("chat.example.com").name == "default/r"
    assert table.route_for("backend.example.com").name == "default/p"
    assert pick(table, "chat.example.com", {}, 0.0) is None  # the only rule needs header x
    assert pick(table, "backend.example.com", {}, 0.0).model == "m-default"


@pytest.mark.parametrize(("specific", "expected"), [
    pytest.param({"model": "m-vip"}, ("m-vip", "sk-default", True), id="no-api-key-inherits-default"),
    pytest.param({"apiKey": "sk-vip"}, ("m-default", "sk-vip", True), id="no-model-inherits-default"),
    pytest.param({"model": "m-vip", "apiKey": "sk-vip", "stream": False}, ("m-vip", "sk-vip", False), id="all-overridden"),
    pytest.param({"stream": False}, ("m-default", "sk-default", False), id="only-stream"),
])
def test_route_specific_config_merges_over_default(tmp_path, specific, expected):
    docs = [provider("p", "backend.example.com", model="m-default", api_key="sk-default", stream=True,
                     route_configs={"vip": specific}),
            route("r", "chat.example.com", [rule("backend.example.com", name="vip", matches=[{"headers": {"x-vip": {}}}]),
                                             rule("backend.example.com", name="other")])]
    table = load_docs(tmp_path, *docs).table
    vip = pick(table, "chat.example.com", {"x-vip": "1"}, 0.0)
    assert (vip.rule, vip.model, vip.api_key, vip.stream) == ("vip", *expected)
    other = pick(table, "chat.example.com", {}, 0.0)
    assert (other.rule, other.model, other.api_key, other.stream) == ("other", "m-default", "sk-default", True)


def test_route_specific_config_applies_per_provider(tmp_path):
    docs = [provider("a", "a.example.com", model="a-default", api_key="sk-a", route_configs={"mix": {"model": "a-mix"}}),
            provider("b", "b.example.com", model="b-default", api_key="sk-b"),
            route("r", "chat.example.com", [rule("a.example.com", "b.example.com", name="mix", weights=[1, 1])])]
    table = load_docs(tmp_path, *docs).table
    a = pick(table, "chat.example.com", {}, 0.1)
    b = pick(table, "chat.example.com", {}, 0.9)
    assert (a.provider_host, a.model, a.api_key) == ("a.example.com", "a-mix", "sk-a")
    assert (b.provider_host, b.model, b.api_key) == ("b.example.com", "b-default", "sk-b")


def test_provider_host_reference_is_case_insensitive(tmp_path):
    table = load_docs(tmp_path, provider("p", "backend.example.com"),
                      route("r", "chat.example.com", [rule("Backend.Example.COM")])).table
    assert pick(table, "chat.example.com", {}, 0.0).provider_host == "backend.example.com"


def test_header_match_names_are_case_insensitive(tmp_path):
    table = load_docs(tmp_path, provider("p", "backend.example.com", model="m-default",
                                         route_configs={"vip": {"model": "m-vip"}}),
                      route("r", "chat.example.com", [rule("backend.example.com", name="vip",
                                                            matches=[{"headers": {"User-Type": {"exact": "subscriber"}}}]),
                                                       rule("backend.example.com")])).table
    assert table.route_for("chat.example.com").match_headers == frozenset({"user-type"})
    assert pick(table, "chat.example.com", {"user-type": "subscriber"}, 0.0).model == "m-vip"


def test_unknown_host_is_refused():
    table = load_seed("01-LLMProvider.yaml").table
    assert pick(table, "unknown.example.com", {}, 0.0) is None


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
