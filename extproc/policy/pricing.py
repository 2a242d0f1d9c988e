"""Prices and the cost of a request: pure decisions, no I/O (`LLMPriceTable`, docs/cost.md).

A price table gives, for the models one provider host serves, a price per million input,
output and cached input tokens in one currency. A request's cost is worked out from the usage
the provider reported for the attempt that answered, at the price of that attempt's provider
and model: cached input tokens (part of the prompt tokens, as OpenAI reports them) at the cached
price, the rest of the prompt at the input price, the completion at the output price.

Amounts are kept as whole pico-units of the currency (10^-12): a price per million tokens with
up to six decimals is a whole number of pico-units per token, so every cost and every sum is
exact, in any currency; amounts of different currencies are never added. A model without a
price is *unpriced*: its requests are counted as such, never as costing 0.

Where a cost budget would plug in: `cost_of` is what the access-log receiver charges token
budgets beside (`extproc.dataplane.accesslog_receiver`), from the same usage; a rule capping
cost per period would be charged `cost_of(...)` pico-units of its currency exactly as tokens
are charged now, and admitted while its bucket is above zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from decimal import Decimal

PICO_PER_UNIT = 10**12  # pico-units in one unit of a currency
PRICE_DECIMALS = 6  # a price per million tokens: pico-units per token need at most six decimals


def price_per_token(per_million: str) -> int:
    """A price per million tokens ("0.30") as whole pico-units per token (300000)."""
    value = Decimal(per_million) * 10**PRICE_DECIMALS
    if value != value.to_integral_value() or value < 0:
        raise ValueError(f"{per_million!r}: a price needs at most {PRICE_DECIMALS} decimals and no sign")
    return int(value)


@dataclass(frozen=True, slots=True)
class Price:
    """What one model of one provider costs: pico-units of `currency` per token."""

    currency: str  # ISO 4217, e.g. USD
    input: int
    output: int
    cached_input: int
    table: str = ""  # the LLMPriceTable's namespace/name

    def per_million(self) -> tuple[float, float, float]:
        """(input, output, cached input) per million tokens, as the access log's CEL reads them."""
        scale = 10**PRICE_DECIMALS
        return self.input / scale, self.output / scale, self.cached_input / scale


@dataclass(frozen=True)
class PriceTable:
    """Every price of a config: per provider host, per model name."""

    by_host: Mapping[str, Mapping[str, Price]] = field(default_factory=dict)

    def price(self, host: str, model: str) -> Price | None:
        return self.by_host.get(host, {}).get(model)


EMPTY_PRICES = PriceTable()


def cost_of(price: Price, prompt_tokens: int | None, completion_tokens: int | None,
            cached_tokens: int | None = None) -> int | None:
    """The cost in pico-units of `price.currency` of an answer's usage; None when the answer
    reported no usage (nothing is estimated). Cached tokens are part of the prompt tokens and
    never more than them."""
    if prompt_tokens is None and completion_tokens is None:
        return None
    prompt = max(prompt_tokens or 0, 0)
    cached = min(max(cached_tokens or 0, 0), prompt)
    return (prompt - cached) * price.input + cached * price.cached_input + max(completion_tokens or 0, 0) * price.output


def pico_from_per_million(value: float) -> int:
    """A price per million tokens as carried in metadata (a double) back to pico-units per token:
    exact for the six decimals a price may have."""
    return int(round(value * 10**PRICE_DECIMALS))


def format_amount(pico: int, decimals: int = 12) -> str:
    """An amount as a decimal string without exponent or trailing zeros ("0.0000435")."""
    text = f"{Decimal(pico) / PICO_PER_UNIT:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
