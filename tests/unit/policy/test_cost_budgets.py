"""Cost budgets (`cost:` in an LLMTokenRateLimit rule): the config (currency as written or of the
route's price tables, never two), a cost bucket admitted and charged as tokens are (exact
pico-units, cached tokens at their price, from the receiver's own cost of the answer), its
x-ratelimit-*-cost headers beside the token ones, an answer of another currency or without a
price never charged as 0, and a model without a price refused before it is sent."""

from __future__ import annotations

import json

import pytest
from envoy.service.accesslog.v3 import als_pb2
from prometheus_client import CollectorRegistry

from extproc.config.file_source import ConfigError
from extproc.dataplane.accesslog_receiver import AccessLogReceiver, charge_budgets, charge_owed, price_answer
from extproc.policy.budget_gate import BudgetGate
from extproc.policy.budgets import (
    COST_BUCKET_PREFIX,
    MICRO,
    BudgetRefused,
    BudgetRule,
    BudgetTable,
    admission,
    bucket_id,
    describe,
    is_cost_bucket,
    key_hash,
    most_restrictive,
    parse_bucket_id,
    response_headers,
    tightest_cost,
    unpriced_under_cap,
)
from extproc.policy.pricing import PICO_PER_UNIT, Price, price_per_token
from extproc.telemetry.access_entries import record_from_entry
from extproc.telemetry.metrics import GatewayMetrics
from support.budget_docs import Clock, answered_entry, budget_doc, headers
from support.manifests import DASHSCOPE, MOONSHOT, load_docs, provider, route, rule

PICO = PICO_PER_UNIT


def prices(host: str = DASHSCOPE, currency: str = "CNY", name: str = "prices", **models: dict) -> dict:
    return {"apiVersion": "llm-gateway.dev/v1alpha1", "kind": "LLMPriceTable", "metadata": {"name": name},
            "spec": {"host": host, "currency": currency,
                     "models": [{"model": m, **p} for m, p in (models or {"m-default": {
                         "input": "1.00", "output": "2.00", "cachedInput": "0.25"}}).items()]}}


def cost_gate(tmp_path, rules: list[dict], *docs: dict):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), prices(), budget_doc(rules), *docs)
    clock = Clock()
    gate = BudgetGate(CollectorRegistry(), lambda: compiled.table, clock=clock)
    gate.clock, gate.table, gate.route = clock, compiled.table, compiled.table.route_for(DASHSCOPE).name
    return gate


def compiled_docs(*docs: dict):
    """Compiled without raising on errors: the problems, and the table of what was accepted."""
    import yaml

    from extproc.config.compile import compile_config
    from extproc.config.loader import load_text

    loaded, problems = load_text(yaml.safe_dump_all(list(docs)), "cfg.yaml")
    assert not problems, problems
    return compile_config(loaded)


def admitted(gate, user: str = "alice"):
    return gate.admit(gate.route, headers(x_user_id=user))


# --- the pure decisions ------------------------------------------------------------------------

CAP = BudgetRule("everyone", (), 20 * PICO, 3600.0, currency="CNY")


def test_a_cost_bucket_has_its_own_name_apart_from_tokens():
    tokens, cost = bucket_id("default/b", "r", "k"), bucket_id("default/b", "r", "k", cost=True)
    assert tokens != cost and cost.startswith(COST_BUCKET_PREFIX + ":")
    assert parse_bucket_id(cost) == parse_bucket_id(tokens) == ("default/b", "r", "k")
    assert is_cost_bucket(cost) and not is_cost_bucket(tokens)


@pytest.mark.parametrize("used, remaining, allowed", [
    (0, "20", True),
    (19.99997625 * PICO, "0.000023", True),  # what is left, to the micro-unit, rounded down
    (20 * PICO - 1, "0", True),  # a pico-unit left: still above zero
    (20 * PICO, "0", False),  # exactly spent: refused, as tokens at zero are
])
def test_a_cost_bucket_admits_while_above_zero_and_tells_what_is_left(used, remaining, allowed):
    answer = admission(CAP, used, 0)
    headers_ = dict(answer.headers)
    assert answer.allowed is allowed and answer.cost
    assert headers_["x-ratelimit-limit-cost"] == "20"
    assert headers_["x-ratelimit-remaining-cost"] == remaining
    assert "x-ratelimit-limit-tokens" not in headers_
    if not allowed:
        assert answer.reason == "cost" and answer.retry_after_s >= 1


def test_a_refused_cost_cap_says_cost_in_openais_error():
    refused = BudgetRefused("default/b", "everyone", admission(CAP, 21 * PICO, 0))
    body = refused.body().decode()
    assert refused.status == 429 and '"type":"cost"' in body and '"code":"rate_limit_exceeded"' in body
    # 1 over, refilled at 20 per hour: 180 s, and the client is told the cost headers
    assert dict(refused.headers)["retry-after"] == "181" and dict(refused.headers)["x-ratelimit-limit-cost"] == "20"


def test_the_tightest_token_bucket_heads_and_the_tightest_cost_bucket_is_told_beside():
    tokens = admission(BudgetRule("t", (), 1000, 60.0), 10, 0)
    small_cost = admission(CAP, 15 * PICO, 0)
    big_cost = admission(BudgetRule("c", (), 100 * PICO, 60.0, currency="CNY"), 0, 0)
    answers = [small_cost, tokens, big_cost]
    head = most_restrictive(answers)
    assert head is tokens  # fewer micro-units left is not fewer tokens: measures are not compared
    assert tightest_cost(answers, head) is small_cost
    refused = admission(CAP, 30 * PICO, 0)
    assert most_restrictive([tokens, refused]) is refused and tightest_cost([tokens, refused], refused) is None


def test_cost_headers_only_where_a_rule_caps_cost():
    token_rule = BudgetRule("t", (), 10, 60.0)
    with_cost = BudgetRule("t", (), 10, 60.0, cost=BudgetRule("t", (), PICO, 60.0, currency="USD"))
    from extproc.policy.budgets import Budget

    def table(r: BudgetRule) -> BudgetTable:
        return BudgetTable.of([("route", Budget("ns/b", "", (r,), frozenset()))])

    assert not any(h.endswith("-cost") for h in response_headers(table(token_rule)))
    assert {"x-ratelimit-limit-cost", "x-ratelimit-remaining-cost", "x-ratelimit-reset-cost",
            "x-ratelimit-limit-tokens"} <= response_headers(table(with_cost))
    cost_only = table(BudgetRule("c", (), PICO, 60.0, currency="USD"))
    assert response_headers(cost_only) == {"x-ratelimit-limit-cost", "x-ratelimit-remaining-cost",
                                           "x-ratelimit-reset-cost"}
    assert cost_only.rule_for(bucket_id("ns/b", "c", "k", cost=True)) is not None
    assert cost_only.rule_for(bucket_id("ns/b", "c", "k")) is None  # no token bucket of that rule


@pytest.mark.parametrize("currencies, price, refused", [
    ((), None, False),  # no cost cap: anything goes, priced or not
    (("CNY",), Price("CNY", 1, 1, 1), False),
    (("CNY",), None, True),  # no price for the model: never let through uncharged
    (("CNY",), Price("USD", 1, 1, 1), True),  # another currency: never added to a CNY cap
])
def test_a_model_without_a_price_in_the_caps_currency_is_refused(currencies, price, refused):
    error = unpriced_under_cap(currencies, price, "qwen-max", DASHSCOPE, "default/b")
    assert (error is not None) is refused
    if error is not None:
        assert (error.status, error.code) == (403, "model_not_priced")
        assert "qwen-max" in error.message and "CNY" in error.message and "default/b" in error.message


# --- the config ---------------------------------------------------------------------------------

@pytest.mark.parametrize("rule_, message", [
    ({"per": "1h"}, "set tokens, cost or both"),
    ({"cost": "0", "per": "1h"}, "cost must be more than 0"),
    ({"cost": "1.0000001", "per": "1h"}, "String should match pattern"),
    ({"tokens": 10, "currency": "CNY", "per": "1h"}, "currency is the currency of cost"),
    ({"cost": "1", "currency": "cny", "per": "1h"}, "String should match pattern"),
])
def test_a_bad_cost_rule_names_its_field(tmp_path, rule_, message):
    with pytest.raises(ConfigError) as error:
        load_docs(tmp_path, provider("dashscope", DASHSCOPE), prices(), budget_doc([rule_]))
    assert "LLMTokenRateLimit default/per-user: spec.rules[0]" in str(error.value) and message in str(error.value)


def test_a_cost_caps_currency_is_its_providers_unless_written(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), prices(),
                         budget_doc([{"name": "r", "tokens": 100, "cost": "20.00", "per": "1h"}]))
    rules = compiled.table.budgets
    token_rule = rules.rules[("default/per-user", "r")]
    assert token_rule.tokens == 100 and token_rule.cost is not None
    assert rules.cost_rules[("default/per-user", "r")] is token_rule.cost
    assert (token_rule.cost.currency, token_rule.cost.tokens) == ("CNY", 20 * PICO)
    # cost alone: the cost bucket is the rule, and counts its requests
    (tmp_path / "b").mkdir()
    alone = load_docs(tmp_path / "b", provider("dashscope", DASHSCOPE), prices(),
                      budget_doc([{"name": "r", "cost": "0.5", "requests": 3, "currency": "CNY", "per": "1d"}]))
    assert not alone.table.budgets.rules
    cap = alone.table.budgets.cost_rules[("default/per-user", "r")]
    assert (cap.tokens, cap.requests, cap.per_s) == (PICO // 2, 3, 86400.0)


@pytest.mark.parametrize("docs, field, reason", [
    # a provider the route reaches has no price table: its answers could never be charged
    (lambda: [provider("moonshot", MOONSHOT, "moonshot-v1-8k"),
              route("mixed", "mixed", [rule(DASHSCOPE, MOONSHOT)])], "cost", "ProviderNotPriced"),
    # two currencies on one route: a cap holds one
    (lambda: [provider("moonshot", MOONSHOT, "moonshot-v1-8k"), prices(MOONSHOT, "USD", "usd", **{
        "moonshot-v1-8k": {"input": "3", "output": "3"}}), route("mixed", "mixed", [rule(DASHSCOPE, MOONSHOT)])],
     "currency", "CurrencyConflict"),
])
def test_a_cost_cap_that_could_not_price_every_answer_is_refused(tmp_path, docs, field, reason):
    compiled = compiled_docs(provider("dashscope", DASHSCOPE), prices(), *docs(),
                             budget_doc([{"name": "r", "cost": "20", "per": "1h"}], host="mixed"))
    (problem,) = [p for p in compiled.problems if p.severity == "error"]
    assert (problem.field, problem.reason) == (f"spec.rules[0].{field}", reason)
    assert problem.obj == "LLMTokenRateLimit default/per-user" and not compiled.table.budgets.by_route


def test_a_written_currency_no_provider_is_priced_in_is_refused(tmp_path):
    with pytest.raises(ConfigError) as error:
        load_docs(tmp_path, provider("dashscope", DASHSCOPE), prices(),
                  budget_doc([{"cost": "20", "currency": "USD", "per": "1h"}]))
    assert "spec.rules[0].currency" in str(error.value) and "priced in another currency than USD" in str(error.value)


def test_a_configured_model_without_a_price_is_a_warning_and_its_requests_are_refused(tmp_path):
    compiled = compiled_docs(provider("dashscope", DASHSCOPE, "qwen-max"), prices(),
                             budget_doc([{"cost": "20", "per": "1h"}]))
    (warning,) = compiled.problems
    assert (warning.severity, warning.reason, warning.field) == ("warning", "ModelNotPriced", "spec.rules[0].cost")
    assert "qwen-max" in warning.message and compiled.table.budgets.by_route


def test_route_describes_a_cost_cap(tmp_path):
    gate = cost_gate(tmp_path, [{"name": "r", "tokens": 100, "cost": "20", "requests": 5, "per": "1h"}])
    lines = describe(gate.table.budgets, gate.route, {"x-user-id": "alice"})
    assert lines[0].startswith("budget default/per-user: rule r: 100 tokens, 20 CNY, 5 requests per 3600s")
    assert "model_not_priced" in lines[1]


# --- admitted and charged as tokens are -----------------------------------------------------------

def test_a_rule_capping_tokens_and_cost_has_two_buckets_both_told_and_both_charged(tmp_path):
    gate = cost_gate(tmp_path, [{"name": "r", "tokens": 1000, "cost": "0.0001", "per": "1h"}])
    first = admitted(gate)
    assert first.currencies == ("CNY",) and len(first.buckets) == 2
    meta = first.as_dict()
    assert meta["ratelimit_limit_tokens"] == "1000" and meta["ratelimit_limit_cost"] == "0.0001"
    assert meta["ratelimit_remaining_cost"] == "0.0001" and meta["budget_currency"] == "CNY"
    # 8 prompt tokens (3 cached) and 9 completion: 5 at 1.00 + 3 at 0.25 + 9 at 2.00 per million
    gate.charge(first.buckets, 17, price_per_token("1.00") * 5 + price_per_token("0.25") * 3
                + price_per_token("2.00") * 9, "CNY")
    meta = admitted(gate).as_dict()
    assert meta["ratelimit_remaining_tokens"] == "983"
    assert meta["ratelimit_remaining_cost"] == "0.000076"  # 0.0001 - 0.00002375, to the micro-unit
    for _ in range(4):  # cost runs out long before tokens
        gate.charge(first.buckets, 17, 23_750_000, "CNY")
    with pytest.raises(BudgetRefused) as refused:
        admitted(gate)
    assert refused.value.kind == "cost" and dict(refused.value.headers)["x-ratelimit-remaining-cost"] == "0"
    assert admitted(gate, "bob").as_dict()["ratelimit_remaining_cost"] == "0.0001"  # its own buckets


def test_an_answer_in_another_currency_or_without_a_price_is_never_charged_as_zero(tmp_path):
    gate = cost_gate(tmp_path, [{"name": "r", "cost": "1", "per": "1h"}])
    buckets = admitted(gate).buckets
    gate.charge(buckets, 17, 5 * MICRO, "USD")  # a USD amount is never added to a CNY cap
    gate.charge(buckets, 17, None, "")  # no price for the model that answered
    gate.charge(buckets, 0, None, "")  # no usage: nothing spent, nothing to say
    assert gate.metrics.unpriced.labels("default/per-user", "r").value == 2
    assert admitted(gate).as_dict()["ratelimit_remaining_cost"] == "1"
    gate.charge(buckets, 17, 5 * MICRO, "CNY")
    assert gate.metrics.cost_series("default/per-user", "r", "CNY").value == pytest.approx(5e-6)
    assert admitted(gate).as_dict()["ratelimit_remaining_cost"] == "0.999995"


def test_the_receiver_charges_the_answers_exact_cost_cached_tokens_included(tmp_path):
    gate = cost_gate(tmp_path, [{"name": "r", "tokens": 1000, "cost": "1", "per": "1h"}])
    meta = admitted(gate).as_dict()
    decision = {"route": gate.route, "provider_host": DASHSCOPE, "request_model": "m-default"}
    owed: dict = {}
    for cached in (3, 0):
        e = answered_entry({**meta, **decision}, total_tokens=17)
        e.common_properties.metadata.filter_metadata["llm_gateway"].update(
            {"prompt_tokens": 8, "completion_tokens": 9, "cached_tokens": cached})
        record = record_from_entry(e)
        price_answer(e, record, gate.table.prices.price(DASHSCOPE, "m-default"))
        charge_budgets(owed, e, record)
    # 23.75 + 26 micro-units, summed per currency and buckets in a batch, charged once
    assert owed == {("CNY", *meta["budget_buckets"]): [34, 23_750_000 + 26_000_000]}
    charge_owed(gate, owed)
    after = admitted(gate).as_dict()
    # 1 - 0.00004975 = 0.99995025: told to the micro-unit, rounded down (kept exact in the bucket)
    assert after["ratelimit_remaining_cost"] == "0.99995" and after["ratelimit_remaining_tokens"] == "966"


def test_the_receiver_prices_and_charges_a_batch_from_envoys_stream(tmp_path):
    gate = cost_gate(tmp_path, [{"name": "r", "cost": "1", "per": "1h"}])
    receiver = AccessLogReceiver(GatewayMetrics(), gate, prices=lambda: gate.table.prices)
    meta = admitted(gate).as_dict()
    e = answered_entry({**meta, "route": gate.route, "provider_host": DASHSCOPE, "request_model": "m-default"}, 17)
    e.common_properties.metadata.filter_metadata["llm_gateway"].update({"prompt_tokens": 8, "completion_tokens": 9})
    batch = als_pb2.StreamAccessLogsMessage()
    batch.http_logs.log_entry.extend([e, e])
    receiver.call().on_message(batch.SerializeToString())
    assert admitted(gate).as_dict()["ratelimit_remaining_cost"] == "0.999948"  # 2 x 26 micro-units
    assert gate.metrics.cost_series("default/per-user", "r", "CNY").value == pytest.approx(52e-6)


def test_requests_of_a_cost_only_rule_are_counted_on_its_cost_bucket(tmp_path):
    gate = cost_gate(tmp_path, [{"name": "r", "cost": "1", "requests": 2, "per": "1h"}])
    for left in ("1", "0"):
        meta = admitted(gate).as_dict()
        assert meta["ratelimit_remaining_requests"] == left and "ratelimit_limit_tokens" not in meta
        assert meta["budget_buckets"] == [bucket_id("default/per-user", "r", meta["budget_key"], cost=True)]
    with pytest.raises(BudgetRefused) as refused:
        admitted(gate)
    assert refused.value.kind == "requests"


def test_the_ext_proc_refuses_a_model_its_cost_cap_cannot_price(tmp_path):
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder
    from support.ext_proc_messages import body_msg, headers_msg

    gate = cost_gate(tmp_path, [{"name": "r", "cost": "1", "per": "1h"}])
    processor = ExternalProcessor(TableHolder(gate.table), budgets=gate)

    def send(path: str, body: dict):
        exchange = processor.exchange()
        message = headers_msg(DASHSCOPE, extra={"x-user-id": "alice"})
        for h in message.request_headers.headers.headers:
            if h.key == ":path":
                h.raw_value = path.encode()
        assert exchange.on_request(message) == ([], False)
        answers, done = exchange.on_request(body_msg(body))
        assert done
        return answers[0]

    chat = send("/v1/chat/completions", {"model": "anything", "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.WhichOneof("response") == "request_headers"  # the config's model (m-default) is priced
    # embeddings keep the client's model: one the table does not price is refused before it is sent
    refused = send("/v1/embeddings", {"model": "text-embedding-x", "input": "Hi"})
    assert refused.immediate_response.status.code == 403
    error = json.loads(refused.immediate_response.body)["error"]
    assert error["code"] == "model_not_priced" and "text-embedding-x" in error["message"]
    assert send("/v1/embeddings", {"model": "m-default", "input": "Hi"}).WhichOneof("response") == "request_headers"


# --- shared through Redis, as tokens are ---------------------------------------------------------

def test_a_cost_cap_spent_on_one_instance_is_refused_on_another_through_redis(tmp_path, redis_server):
    """Two gates on one real Redis (two instances): the cost bucket goes through the same mirror,
    sync and admission script as a token bucket, so an instance that never saw the key refuses it
    once another spent its cost, while its tokens are far from spent; Redis holds pico-units."""
    import asyncio

    from extproc.policy.budget_gate import Waiting

    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), prices(),
                         budget_doc([{"name": "r", "tokens": 10**6, "cost": "0.0001", "per": "30d"}]))
    route = compiled.table.route_for(DASHSCOPE).name
    a, b = (BudgetGate(CollectorRegistry(), lambda: compiled.table, redis_url=redis_server.url, sync_interval=0.02)
            for _ in range(2))

    async def outcome(gate, user):
        try:
            result = gate.admit(route, headers(x_user_id=user))
        except BudgetRefused as refused:
            return refused
        if isinstance(result, Waiting):
            future = asyncio.get_running_loop().create_future()
            result.then(future.set_result)
            return await asyncio.wait_for(future, 5)
        return result

    async def scenario():
        for gate in (a, b):
            await gate.start()
        try:
            first = await outcome(a, "alice")
            assert first.currencies == ("CNY",)
            a.charge(first.buckets, 17, 60_000_000, "CNY")  # 0.00006 of 0.0001
            a.charge(first.buckets, 17, 50_000_000, "CNY")  # 0.00011: spent (one answer overdraws, as tokens do)
            assert isinstance(await outcome(a, "alice"), BudgetRefused)
            assert await a.sync()  # what a owes is in Redis
            refused = await outcome(b, "alice")  # b never saw alice: Redis decides, on the cost bucket
            other = await outcome(b, "bob")
            return refused, other
        finally:
            for gate in (a, b):
                await gate.stop()

    refused, other = asyncio.run(scenario())
    assert isinstance(refused, BudgetRefused) and refused.kind == "cost", refused
    assert dict(refused.headers)["x-ratelimit-remaining-cost"] == "0"
    assert other.as_dict()["ratelimit_remaining_cost"] == "0.0001"
    held = float(redis_server.client().hget(bucket_id("default/per-user", "r", key_hash("alice"), cost=True), "tok"))
    assert 109_990_000 < held <= 110_000_000  # pico-units, drained a little since
    tokens = float(redis_server.client().hget(bucket_id("default/per-user", "r", key_hash("alice")), "tok"))
    assert 33.9 < tokens <= 34  # the tokens, in their own bucket
