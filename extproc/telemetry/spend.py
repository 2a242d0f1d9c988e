"""Who spent what: usage and cost per caller, route, provider, model and currency, since the
process started (docs/cost.md).

One ledger entry per (caller, route, provider, model, currency) holds requests, input, output
and cached input tokens, and the cost in whole pico-units (exact). It is exposed as Prometheus
counters (so `/metrics`, the dashboard and `serve --workers N`'s sum over processes all read
the same numbers), and `spend_report` answers `/spend` and `extproc spend` from those counters.
A request whose model has no price has currency "" and no cost: it is counted as unpriced,
never as costing 0.

Label values are bounded: callers and models not from the config are capped in number (then
`other`), as the other metrics' provider-reported models are.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.metrics_core import Metric

PICO = 10**12
MAX_CALLERS = 200  # distinct caller values; more are "other"
MAX_MODELS = 200
LABELS = ("llm_caller", "llm_route", "llm_provider", "gen_ai_request_model", "currency")
REQUESTS = "llm_gateway_spend_requests"
TOKENS = "llm_gateway_spend_tokens"
COST = "llm_gateway_cost"
GROUPS = ("caller", "route", "provider", "model", "currency")

SpendKey = tuple[str, str, str, str, str]  # caller, route, provider, model, currency ("" unpriced)


class SpendLedger:
    """The counts behind the spend metrics; updated by the access-log receiver, one entry per
    answer that reported usage: one dictionary lookup and five additions."""

    def __init__(self, registry: CollectorRegistry | None = None, clock: Any = time.time):
        self.since = clock()
        # per capped key: requests, input, output, cached input tokens, cost (pico-units)
        self.entries: dict[SpendKey, list[int]] = {}
        self._lookup: dict[SpendKey, list[int]] = {}  # per key as received: its (capped) entry
        self._callers: set[str] = set()
        self._models: set[str] = set()
        if registry is not None:
            registry.register(self)

    def entry(self, key: SpendKey) -> list[int]:
        """The counts kept for `key` (capped), to add to."""
        entry = self._lookup.get(key)
        return entry if entry is not None else self._new(key)

    def add(self, key: SpendKey, prompt: int, completion: int, cached: int, cost: int) -> None:
        entry = self.entry(key)
        entry[0] += 1
        entry[1] += prompt
        entry[2] += completion
        entry[3] += cached
        entry[4] += cost

    def _new(self, key: SpendKey) -> list[int]:
        caller, route, provider, model, currency = key
        capped = (self._capped(self._callers, caller, MAX_CALLERS), route, provider,
                  self._capped(self._models, model, MAX_MODELS), currency)
        entry = self.entries.get(capped)
        if entry is None:
            entry = self.entries[capped] = [0, 0, 0, 0, 0]
        if len(self._lookup) > 4 * (MAX_CALLERS * MAX_MODELS):  # raw keys past the caps: start again
            self._lookup.clear()
        self._lookup[key] = entry
        return entry

    @staticmethod
    def _capped(seen: set[str], value: str, limit: int) -> str:
        if value in seen or not value:
            return value
        if len(seen) >= limit:
            return "other"
        seen.add(value)
        return value

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily(REQUESTS, "", labels=LABELS)]

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(REQUESTS, "Answers that reported usage, by caller, route, provider, model and "
                                                 "currency (\"\": the model has no price)", labels=LABELS)
        tokens = CounterMetricFamily(TOKENS, "Tokens of those answers, by type: input, output, cached_input "
                                             "(part of input)", labels=(*LABELS, "gen_ai_token_type"))
        cost = CounterMetricFamily(COST, "What those answers cost, in units of `currency` (priced models only)",
                                   labels=LABELS)
        for key, entry in list(self.entries.items()):
            if not entry[0]:
                continue
            labels = list(key)
            requests.add_metric(labels, entry[0])
            for kind, value in (("input", entry[1]), ("output", entry[2]), ("cached_input", entry[3])):
                tokens.add_metric([*labels, kind], value)
            if labels[4]:
                cost.add_metric(labels, entry[4] / PICO)
        yield from (requests, tokens, cost)


def spend_report(families: Iterable[Metric], by: Sequence[str] = ("caller", "model", "route"),
                 since: float | None = None) -> dict[str, Any]:
    """The spend counters (of one process, or summed over workers) as a report: totals per
    currency, what is unpriced, and one row per group of `by` (a subset of caller, route,
    provider, model; currency is always kept apart). Costs are decimal strings."""
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}: use {', '.join(GROUPS[:4])}")
    keep = [GROUPS.index(g) for g in by if g != "currency"]
    rows: dict[tuple[str, ...], dict[str, Any]] = {}

    def row(labels: dict[str, str]) -> dict[str, Any]:
        values = [labels.get(name, "") for name in LABELS]
        group = tuple(values[i] for i in keep) + (values[4],)
        found = rows.get(group)
        if found is None:
            found = rows[group] = {**{GROUPS[i]: values[i] for i in keep}, "currency": values[4] or None,
                                   "requests": 0, "input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0,
                                   "cost": Decimal(0) if values[4] else None}
        return found

    for family in families:
        for sample in family.samples:
            if sample.name == REQUESTS + "_total":
                row(sample.labels)["requests"] += int(sample.value)
            elif sample.name == TOKENS + "_total":
                kind = sample.labels.get("gen_ai_token_type", "")
                field = {"input": "input_tokens", "output": "output_tokens", "cached_input": "cached_input_tokens"}
                if kind in field:
                    row(sample.labels)[field[kind]] += int(sample.value)
            elif sample.name == COST + "_total":
                found = row(sample.labels)
                found["cost"] = (found["cost"] or Decimal(0)) + Decimal(repr(sample.value))
    start = since
    totals: dict[str, Decimal] = {}
    unpriced = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    out_rows = []
    for found in sorted(rows.values(), key=lambda r: (r["currency"] or "", -(r["cost"] or 0), -r["requests"])):
        if found["currency"]:
            totals[found["currency"]] = totals.get(found["currency"], Decimal(0)) + found["cost"]
            found["cost"] = _amount(found["cost"])
        else:
            for name in unpriced:
                unpriced[name] += found[name]
        out_rows.append(found)
    return {"since": _iso(start) if start is not None else None, "by": list(by),
            "totals": [{"currency": c, "cost": _amount(v)} for c, v in sorted(totals.items())],
            "unpriced": unpriced, "rows": out_rows}


def _amount(value: Decimal) -> str:
    """A cost as text: rounded to the pico-unit, no exponent, no trailing zeros."""
    text = f"{value.quantize(Decimal(1).scaleb(-12)):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for a terminal (`extproc spend`)."""
    by = [g for g in report["by"] if g != "currency"]
    header = [*by, "currency", "requests", "input", "output", "cached", "cost"]
    lines = [[*(str(r.get(g) or "-") for g in by), r["currency"] or "unpriced", str(r["requests"]),
              str(r["input_tokens"]), str(r["output_tokens"]), str(r["cached_input_tokens"]), r["cost"] or "-"]
             for r in report["rows"]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    out = [f"spend since {report['since'] or 'start'}"]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    for total in report["totals"]:
        out.append(f"total {total['currency']}: {total['cost']}")
    unpriced = report["unpriced"]
    if unpriced["requests"]:
        out.append(f"unpriced: {unpriced['requests']} requests, {unpriced['input_tokens']} input and "
                   f"{unpriced['output_tokens']} output tokens (no LLMPriceTable prices their model)")
    return "\n".join(out)
