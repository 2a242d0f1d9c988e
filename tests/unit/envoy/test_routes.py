"""The routes sent over RDS: the sidecars' LLM hosts and the traffic passed through untouched,
the hosts forwarded to an egress gateway, and the rate-limit headers a config can give."""

from __future__ import annotations

import pytest

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
    from extproc.policy.budgets import response_headers
    from extproc.envoy.routes import route_configuration

    docs = [provider("dashscope", DASHSCOPE)] + ([budget_doc(rules)] if rules else [])
    names = response_headers(load_docs(tmp_path, *docs).table.budgets)
    assert names == expected
    vhost = route_configuration([DASHSCOPE], budget_headers=names)["virtual_hosts"][0]
    assert {h["header"]["key"] for h in vhost.get("response_headers_to_add", [])} == expected
