"""The rule of which path a route's chat requests could take (`body_needs`): every part of a
config that needs the body in the ext_proc keeps the route on the body path, each named."""

from __future__ import annotations

from dataclasses import replace

import pytest

from extproc.policy import body_path as bp
from extproc.policy.budgets import Budget, BudgetRule, BudgetTable
from extproc.policy.data_protection.policy import ProtectionTable, RouteGuards
from extproc.policy.table import Failover, RetryPolicy, Route, RoutingTable, Rule, Target
from support.manifests import load_seed
from support.table_parts import target

T = target("a")
TABLE = RoutingTable(routes={}, clusters={})


def route_of(*targets: Target, failover: Failover | None = None) -> Route:
    rule = Rule("r0", (), targets, tuple(range(1, len(targets) + 1)), failover)
    return Route("ns/r", (rule,), frozenset())


def budget(currency: str) -> Budget:
    return Budget("ns/b", "", (BudgetRule("rules[0]", (), 1000, 60.0, currency=currency),), frozenset())


RETRY = Failover(RetryPolicy(1, None, ("5xx",), ()), ((T,),))


@pytest.mark.parametrize("route, table, contents, needs", [
    pytest.param(route_of(T), TABLE, False, (), id="plain-openai-route-headers-only"),
    pytest.param(route_of(T, replace(T, provider="ns/b")), TABLE, False, (), id="weighted-still-headers-only"),
    pytest.param(route_of(replace(T, prices={"a": object()})), TABLE, False, (), id="priced-model-known-from-config"),
    pytest.param(route_of(T), replace(TABLE, protection=ProtectionTable({"ns/r": RouteGuards(None)})), False,
                 (bp.DATA_POLICY,), id="data-policy"),
    pytest.param(route_of(T), replace(TABLE, protection=ProtectionTable({"ns/other": RouteGuards(None)})), False,
                 (), id="another-routes-data-policy"),
    pytest.param(route_of(T, replace(T, api="anthropic")), TABLE, False, (bp.TRANSLATED,), id="translated"),
    pytest.param(route_of(replace(T, api="azure")), TABLE, False, (), id="azure-speaks-openai-bodies"),
    pytest.param(route_of(T, replace(T, stream=False)), TABLE, False, (bp.FORCED_STREAM,), id="forced-stream"),
    pytest.param(route_of(replace(T, model=None)), TABLE, False, (bp.CLIENT_MODEL,), id="clients-model"),
    pytest.param(route_of(T, failover=RETRY), TABLE, False, (bp.RETRIES,), id="retries"),
    pytest.param(route_of(replace(T, pool="p.ns.svc")), TABLE, False, (bp.POOL,), id="pool"),
    pytest.param(route_of(T), replace(TABLE, budgets=BudgetTable.of([("ns/r", budget(""))])), False, (),
                 id="token-budget-reads-headers-only"),
    pytest.param(route_of(T), replace(TABLE, budgets=BudgetTable.of([("ns/r", budget("CNY"))])), False,
                 (bp.COST_CAP,), id="cost-cap"),
    pytest.param(route_of(T), TABLE, True, (bp.TRACE_CONTENTS,), id="trace-contents"),
    pytest.param(route_of(replace(T, api="gemini", stream=True, model=None), failover=RETRY), TABLE, True,
                 (bp.TRANSLATED, bp.FORCED_STREAM, bp.CLIENT_MODEL, bp.RETRIES, bp.TRACE_CONTENTS),
                 id="every-reason-once-in-order"),
])
def test_body_needs(route: Route, table: RoutingTable, contents: bool, needs: tuple[str, ...]) -> None:
    assert bp.body_needs(route, table, contents) == needs


def test_the_seeds_routes() -> None:
    """The seed: the weighted route reaches Moonshot, whose config forces `stream: false`, so it
    keeps the body path; DashScope's own host could go headers-only."""
    table = load_seed("01-LLMProvider.yaml", "04-LLMProvider-moonshot.yaml", "06-LLMRoute-weighted.yaml").table
    weighted = {r.name: r for r in table.routes.values() if len(r.rules[0].targets) > 1}
    assert weighted, "the seed's weighted route is in the table"
    for r in weighted.values():
        assert bp.body_needs(r, table) == (bp.FORCED_STREAM,)
    dashscope = load_seed("01-LLMProvider.yaml").table
    assert dashscope.routes and {bp.body_needs(r, dashscope) for r in dashscope.routes.values()} == {()}
