"""Prices and cost: exact pico-units, cached tokens at their own price, unpriced never 0."""

from __future__ import annotations

import pytest

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.policy.pricing import Price, PriceTable, cost_of, format_amount, pico_from_per_million, price_per_token

PRICE = Price("USD", price_per_token("2.50"), price_per_token("10"), price_per_token("1.25"))


@pytest.mark.parametrize("text, pico", [("0", 0), ("1", 1_000_000), ("0.30", 300_000), ("2.5", 2_500_000),
                                        ("0.000001", 1), ("123456789.999999", 123_456_789_999_999)])
def test_a_price_per_million_is_whole_pico_units_per_token(text, pico):
    assert price_per_token(text) == pico
    assert pico_from_per_million(pico / 1e6) == pico  # as the metadata's double carries it back


@pytest.mark.parametrize("text", ["0.0000001", "-1"])
def test_more_than_six_decimals_or_a_sign_is_refused(text):
    with pytest.raises(ValueError):
        price_per_token(text)


@pytest.mark.parametrize("prompt, completion, cached, cost", [
    (1_000_000, 0, None, "2.5"),  # input price per million
    (0, 1_000_000, None, "10"),
    (100, 50, None, "0.00075"),  # 100 * 2.5e-6 + 50 * 10e-6
    (100, 50, 40, "0.0007"),  # 60 at 2.50, 40 cached at 1.25, 50 at 10
    (100, 50, 400, "0.000625"),  # cached never more than the prompt
    (7, None, None, "0.0000175"),  # embeddings: no completion
])
def test_cost_of_usage(prompt, completion, cached, cost):
    assert format_amount(cost_of(PRICE, prompt, completion, cached)) == cost


def test_no_usage_has_no_cost_rather_than_zero():
    assert cost_of(PRICE, None, None) is None
    assert cost_of(PRICE, 0, 0) == 0  # usage of nothing does cost nothing


def test_amounts_are_exact_where_floats_are_not():
    tenth = Price("EUR", price_per_token("0.1"), price_per_token("0.2"), price_per_token("0.1"))
    total = sum(cost_of(tenth, 1, 1) or 0 for _ in range(10))
    assert format_amount(total) == "0.000003"  # 10 * (0.1 + 0.2) per million: no 0.30000000000000004


TABLES = """
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: a}
spec:
  host: a.example.com
  configs: {defaultConfig: {openAIConfig: {model: m1, apiKey: k}}}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: a-prices}
spec:
  host: a.example.com
  currency: USD
  models:
  - {model: m1, input: "0.5", output: 1.5}
  - {model: m2, input: "1", output: "2", cachedInput: "0.1"}
"""


def compiled(text: str):
    loaded, problems = load_text(text, "f.yaml")
    assert not problems, problems
    return compile_config(loaded)


def test_price_tables_compile_onto_the_table_and_each_target():
    result = compiled(TABLES)
    assert not result.problems
    prices = result.table.prices
    assert prices.price("a.example.com", "m1") == Price("USD", 500_000, 1_500_000, 500_000, "default/a-prices")
    assert prices.price("a.example.com", "m2").cached_input == 100_000
    assert prices.price("a.example.com", "m3") is None  # unpriced
    (target,) = result.table.routes["a.example.com"].rules[0].targets
    assert set(target.prices) == {"m1", "m2"}
    assert "LLMPriceTable default/a-prices" in [o.label for o in result.accepted]


@pytest.mark.parametrize("extra, field, reason", [
    ("""
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: nobody}
spec: {host: b.example.com, currency: USD, models: [{model: m1, input: "1", output: "1"}]}
""", "spec.host", "HostNotFound"),
    ("""
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: z-second}
spec: {host: a.example.com, currency: EUR, models: [{model: m1, input: "1", output: "1"}]}
""", "spec.host", "HostConflict"),
])
def test_a_price_table_for_no_provider_or_a_second_one_is_refused_by_field(extra, field, reason):
    result = compiled(TABLES + "---" + extra)
    (problem,) = result.problems
    assert (problem.field, problem.reason) == (field, reason)
    assert result.table.prices.price("a.example.com", "m1").currency == "USD"  # the first one stands


@pytest.mark.parametrize("spec, field", [
    ('{host: a.example.com, currency: usd, models: [{model: m, input: "1", output: "1"}]}', "spec.currency"),
    ('{host: a.example.com, currency: USD, models: [{model: m, input: "1.1234567", output: "1"}]}',
     "spec.models[0].input"),
    ('{host: a.example.com, currency: USD, models: [{model: m, input: "-1", output: "1"}]}', "spec.models[0].input"),
    ('{host: a.example.com, currency: USD, models: [{model: m, input: "1", output: "1"}, '
     '{model: m, input: "2", output: "2"}]}', "spec"),  # "models: each model is priced once (repeated: m)"
    ('{host: a.example.com, currency: USD, models: []}', "spec.models"),
])
def test_bad_prices_are_named_by_field(spec, field):
    _, problems = load_text(f"apiVersion: llm-gateway.dev/v1alpha1\nkind: LLMPriceTable\nmetadata: {{name: p}}\n"
                            f"spec: {spec}\n", "p.yaml")
    assert problems and problems[0].field == field, problems
    assert problems[0].obj == "LLMPriceTable default/p" and problems[0].file == "p.yaml"


def test_kubernetes_a_price_table_prices_only_its_own_namespaces_provider():
    text = TABLES.replace("metadata: {name: a-prices}", "metadata: {name: a-prices, namespace: other}")
    loaded, _ = load_text(text, "f.yaml")
    result = compile_config(loaded, namespaces=True, home="llm-system")
    (problem,) = result.problems
    assert problem.reason == "ProviderNotInNamespace" and problem.field == "spec.host"
    assert result.table.prices == PriceTable({})
