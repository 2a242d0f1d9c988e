"""The one decision function (`decide`): the provider a chat request is sent to, as the config's
routes, rules, weights and route-specific configs say."""

from __future__ import annotations

import random

import pytest

from extproc.errors import GatewayError
from extproc.policy.caller import LOCAL
from extproc.policy.decide import Decision, decide
from extproc.policy.table import RoutingTable, Target
from extproc.protocol import provider_cluster
from support.manifests import (
    DASHSCOPE,
    DASHSCOPE_KEY,
    MOONSHOT,
    MOONSHOT_KEY,
    load_docs,
    load_seed,
    provider,
    route,
    rule,
)


def pick(table: RoutingTable, authority: str, headers: dict[str, str], draw: float) -> Target | None:
    """The provider the one decision function picks for a chat request, or None when it
    answers 404 (no route, no rule)."""
    raw = {":authority": authority.encode(), ":method": b"POST", ":path": b"/v1/chat/completions",
           **{k: v.encode() for k, v in headers.items()}}
    try:
        decision = decide(table, raw, True, LOCAL, draw, dict)
    except GatewayError as refusal:
        assert refusal.status == 404
        return None
    assert isinstance(decision, Decision)
    return decision.target


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
                      route("r", "chat.example.com",
                            [rule("backend.example.com", matches=[{"headers": {"x": {}}}])])).table
    assert table.route_for("chat.example.com").name == "default/r"
    assert table.route_for("backend.example.com").name == "default/p"
    assert pick(table, "chat.example.com", {}, 0.0) is None  # the only rule needs header x
    assert pick(table, "backend.example.com", {}, 0.0).model == "m-default"


@pytest.mark.parametrize(("specific", "expected"), [
    pytest.param({"model": "m-vip"}, ("m-vip", "sk-default", True), id="no-api-key-inherits-default"),
    pytest.param({"apiKey": "sk-vip"}, ("m-default", "sk-vip", True), id="no-model-inherits-default"),
    pytest.param({"model": "m-vip", "apiKey": "sk-vip", "stream": False}, ("m-vip", "sk-vip", False),
                 id="all-overridden"),
    pytest.param({"stream": False}, ("m-default", "sk-default", False), id="only-stream"),
])
def test_route_specific_config_merges_over_default(tmp_path, specific, expected):
    docs = [provider("p", "backend.example.com", model="m-default", api_key="sk-default", stream=True,
                     route_configs={"vip": specific}),
            route("r", "chat.example.com", [rule("backend.example.com", name="vip",
                                                  matches=[{"headers": {"x-vip": {}}}]),
                                             rule("backend.example.com", name="other")])]
    table = load_docs(tmp_path, *docs).table
    vip = pick(table, "chat.example.com", {"x-vip": "1"}, 0.0)
    assert (vip.rule, vip.model, vip.api_key, vip.stream) == ("vip", *expected)
    other = pick(table, "chat.example.com", {}, 0.0)
    assert (other.rule, other.model, other.api_key, other.stream) == ("other", "m-default", "sk-default", True)


def test_route_specific_config_applies_per_provider(tmp_path):
    docs = [provider("a", "a.example.com", model="a-default", api_key="sk-a",
                     route_configs={"mix": {"model": "a-mix"}}),
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
                      route("r", "chat.example.com",
                            [rule("backend.example.com", name="vip",
                                  matches=[{"headers": {"User-Type": {"exact": "subscriber"}}}]),
                             rule("backend.example.com")])).table
    assert table.route_for("chat.example.com").match_headers == frozenset({"user-type"})
    assert pick(table, "chat.example.com", {"user-type": "subscriber"}, 0.0).model == "m-vip"


def test_unknown_host_is_refused():
    table = load_seed("01-LLMProvider.yaml").table
    assert pick(table, "unknown.example.com", {}, 0.0) is None
