"""Table tests of failover's pure decisions: attempt order, the attempt order's headers, the first
attempt, the per-attempt rewrite's target lookup, and the failover a rule's config compiles to."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.policy.failover import attempt_order, build_failover, full_order, order_headers, retry_target
from extproc.policy.table import RetryPolicy, Target
from support.failover_config import CONFIG, compiled


def t(host: str) -> Target:
    return Target("r", "rule", f"ns/{host}", host, f"c_{host}", "/v1", f"m-{host}", None, f"key-{host}")


A, B, C, D = (t(h) for h in "abcd")


@pytest.mark.parametrize("picked, weights, fallbacks, expected", [
    (0, (50, 50), (C,), "abc"),
    (1, (50, 50), (C,), "bac"),
    (0, (10, 0, 30), (), "acb"),      # others by weight, highest first; weight 0 last
    (1, (10, 0, 30), (), "bca"),
    (0, (50, 50), (B, C), "abc"),     # a provider named twice is tried once, where it comes first
    (0, (1,), (D, C), "adc"),         # fallbacks in written order
])
def test_full_order(picked, weights, fallbacks, expected):
    targets = (A, B, C)[: len(weights)]
    order = full_order(picked, targets, weights, fallbacks)
    assert "".join(x.provider_host for x in order) == expected


@pytest.mark.parametrize("attempts, cooling, expected", [
    (2, set(), "abc"),
    (1, set(), "ab"),
    (0, set(), "a"),
    (5, set(), "abc"),                # never longer than the providers there are
    (2, {"a"}, "bc"),                 # the pick is cooling: the next provider goes first
    (1, {"b"}, "ac"),
    (2, {"a", "b", "c"}, "a"),        # all cooling: the pick alone, tried anyway
])
def test_attempt_order(attempts, cooling, expected):
    failover = build_failover((A, B), (50, 50), (C,), RetryPolicy.from_config(attempts, None, ["5xx"]))
    assert "".join(x.provider_host for x in attempt_order(failover, 0, cooling)) == expected


def test_order_headers_name_each_next_cluster():
    headers = dict(order_headers((A, B, C), RetryPolicy.from_config(2, None, ["5xx"])))
    assert headers["x-llm-gateway-order"] == "c_a,c_b,c_c"
    assert headers["x-llm-gateway-next-c_a"] == "c_b" and headers["x-llm-gateway-next-c_b"] == "c_c"
    assert headers["x-llm-gateway-next-c_c"] == "llm_gateway_no_provider"
    assert not any("key-" in v for v in headers.values())  # no key in a header Envoy routes on


def test_config_compiles_to_orders_policy_and_thresholds():
    c = compiled(CONFIG)
    assert not [p for p in c.problems if p.severity == "error"]
    rule = c.table.route_for("svc").rules[0]
    assert rule.failover.policy == RetryPolicy(1, 20.0, ("5xx",), (429,))
    (order,) = rule.failover.orders
    assert [x.model for x in order] == ["ma", "mb-main"]  # the rule's routeSpecificConfig for b
    assert order[0].timeout_s is None and order[1].timeout_s == 10.0  # a total bound only where set
    assert c.table.health == {"a.example.com": (5, 60.0), "b.example.com": (3, 30.0)}
    # the retry of attempt 2 is rewritten for b, with the rule's own config for b
    target = retry_target(c.table, "default/r", "main", "llm_failover_a_example_com,llm_failover_b_example_com", 2)
    assert target.provider_host == "b.example.com" and target.model == "mb-main" and target.api_key == "kb"
    with pytest.raises(GatewayError):
        retry_target(c.table, "default/r", "main", "llm_failover_a_example_com", 2)  # beyond the order


def test_rule_without_retries_has_no_failover():
    c = compiled(CONFIG.replace("    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}\n", ""))
    assert c.table.route_for("svc").rules[0].failover is None


def test_cooling_provider_is_left_out_of_the_first_attempt():
    from extproc.policy.failover import first_attempt

    rule = compiled(CONFIG).table.route_for("svc").rules[0]
    target, headers = first_attempt(rule.failover, 0, {"a.example.com": 99.0})
    assert target.provider_host == "b.example.com"
    values = dict(headers)
    assert values["x-llm-gateway-order"] == "llm_failover_b_example_com"
    assert first_attempt(rule.failover, 0, {})[0].provider_host == "a.example.com"


def test_dry_run_describes_policy_and_orders():
    from extproc.policy.failover import describe_failover

    rule = compiled(CONFIG).table.route_for("svc").rules[0]
    text = describe_failover(rule)
    assert "attempts=1 perTryTimeout=20s retryOn=5xx,429" in text
    assert "when a.example.com is picked: a.example.com -> b.example.com" in text
    plain = compiled(CONFIG.replace("    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}\n", ""))
    assert describe_failover(plain.table.route_for("svc").rules[0]).startswith("retries: none")


@pytest.mark.parametrize(("unresolved", "cooling", "first"), [
    pytest.param(frozenset(), {}, "a.example.com", id="all-resolve"),
    pytest.param(frozenset({"a.example.com"}), {}, "b.example.com", id="pick-does-not-resolve"),
    pytest.param(frozenset({"b.example.com"}), {}, "a.example.com", id="fallback-does-not-resolve"),
    pytest.param(frozenset({"a.example.com"}), {"b.example.com": 9.0}, "a.example.com", id="none-left-the-pick"),
])
def test_a_provider_whose_name_does_not_resolve_is_left_out(unresolved, cooling, first):
    """Envoy answers a cluster without an address itself and never retries it: decide() leaves
    such providers out of the attempt order, as providers cooling down (all left out: the pick)."""
    from dataclasses import replace

    from extproc.policy.caller import LOCAL
    from extproc.policy.decide import decide

    table = replace(compiled(CONFIG).table, unresolved=unresolved)
    headers = {":authority": b"svc", ":method": b"POST", ":path": b"/v1/chat/completions"}
    decision = decide(table, headers, True, LOCAL, 0.0, lambda: cooling)
    assert decision.target.provider_host == first
    order = dict(decision.attempt_headers)["x-llm-gateway-order"]
    assert order.split(",")[0] == decision.target.cluster
    if unresolved and not cooling:
        assert all(host.replace(".", "_") not in order for host in unresolved)
