"""The routes sent over RDS: the sidecars' LLM hosts and the traffic passed through untouched,
the hosts forwarded to an egress gateway, and the rate-limit headers a config can give."""

from __future__ import annotations

import pytest

from extproc.envoy.routes import PASSTHROUGH_CLUSTER, route_configuration, to_route_proto
from extproc.protocol import CLUSTER_HEADER
from support.budget_docs import RULES, budget_doc
from support.manifests import DASHSCOPE, load_docs, provider


@pytest.mark.parametrize(("rules", "expected"), [
    (None, set()),  # no budget: no header formatted for any answer
    ([{"name": "everyone", "tokens": 40, "per": "1h"}],
     {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}),
    (RULES, {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
             "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}),
])
def test_routes_carry_only_the_rate_limit_headers_a_config_can_give(tmp_path, rules, expected):
    from extproc.envoy.routes import route_configuration
    from extproc.policy.budgets import response_headers

    docs = [provider("dashscope", DASHSCOPE)] + ([budget_doc(rules)] if rules else [])
    names = response_headers(load_docs(tmp_path, *docs).table.budgets)
    assert names == expected
    vhost = route_configuration([DASHSCOPE], budget_headers=names)["virtual_hosts"][0]
    assert {h["header"]["key"] for h in vhost.get("response_headers_to_add", [])} == expected


def test_sidecar_routes_send_forwarded_hosts_to_the_gateway_untouched():
    config = route_configuration(["b.example.com", "shared"], forwarded={
        "chat": "llm_egress_llm-gateway_egress", "chat.default": "llm_egress_llm-gateway_egress",
        "talk": "llm_egress_llm-gateway_other", "shared": "llm_egress_llm-gateway_other"})
    llm, egress, other, passthrough = config["virtual_hosts"]
    assert llm["domains"] == ["b.example.com"]  # a host in both (a change rolling out) goes to the gateway
    assert llm["routes"][0]["route"]["cluster_header"] == CLUSTER_HEADER
    assert (egress["name"], egress["domains"]) == ("llm_egress_llm-gateway_egress", ["chat", "chat.default"])
    assert (other["name"], other["domains"]) == ("llm_egress_llm-gateway_other", ["shared", "talk"])
    route_ = egress["routes"][0]
    assert route_["route"] == {"cluster": "llm_egress_llm-gateway_egress", "timeout": "0s"}  # no host rewrite
    assert route_["typed_per_filter_config"] == passthrough["routes"][0]["typed_per_filter_config"]
    assert route_["typed_per_filter_config"]["envoy.filters.http.ext_proc"]["disabled"] is True
    assert "request_headers_to_remove" not in egress
    assert passthrough["routes"][0]["route"]["cluster"] == PASSTHROUGH_CLUSTER
    to_route_proto(config)  # valid Envoy API


def test_sidecar_route_configuration():
    config = route_configuration(["svc.default", "dashscope.aliyuncs.com", "svc.default"])
    llm, passthrough = config["virtual_hosts"]
    assert llm["domains"] == ["dashscope.aliyuncs.com", "svc.default"]
    assert llm["routes"][0]["route"]["cluster_header"] == CLUSTER_HEADER
    assert passthrough["domains"] == ["*"]
    route = passthrough["routes"][0]
    assert route["route"]["cluster"] == PASSTHROUGH_CLUSTER
    assert set(route["typed_per_filter_config"]) == {"envoy.filters.http.ext_proc", "llm_gateway.answer",
                                                    "envoy.filters.http.json_to_metadata",
                                                    "llm_gateway.event_stream"}
    assert "request_headers_to_remove" not in passthrough  # other traffic leaves untouched
    to_route_proto(config)  # valid Envoy API
    assert [vh["name"] for vh in route_configuration([])["virtual_hosts"]] == ["passthrough"]


def test_the_answer_reader_is_on_only_where_traces_are_exported():
    from extproc.envoy.answer_reader import ANSWER_READER, CONTENTS, FINISH
    from extproc.envoy.routes import any_host_route_configuration, route_configuration, to_route_proto

    off = route_configuration(["svc"])
    assert ANSWER_READER not in off["virtual_hosts"][0]["typed_per_filter_config"]
    for script in (FINISH, CONTENTS):
        for config in (route_configuration(["svc"], reader=script), any_host_route_configuration([], reader=script)):
            proto = to_route_proto(config)  # Envoy's types: the Lua per-route config names a script of the filter
            vhost = proto.virtual_hosts[0]
            assert ANSWER_READER in vhost.typed_per_filter_config
            assert config["virtual_hosts"][0]["typed_per_filter_config"][ANSWER_READER]["config"]["name"] == script
