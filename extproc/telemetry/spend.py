"""Who spent what: usage and cost per caller, route, provider, model and currency, since the
process started (docs/cost.md).

One ledger entry per (caller, route, provider, model, currency) holds requests, input, output
and cached input tokens, the cost in whole pico-units (exact), and the attempts that reached the
provider but whose usage nobody saw (*unmetered*: a timeout, a reset, a cut stream, a client
that left, an answer without usage; the provider may have billed them, for tokens unknown). It
is exposed as Prometheus counters (so `/metrics`, the dashboard and `serve --workers N`'s sum
over processes all read the same numbers), and `spend_report` answers `/spend` and `extproc
spend` from those counters (`extproc.telemetry.spend_redis` keeps the same counts in Redis
across instances, and answers from there). A request whose model has no price has currency ""
and no cost: it is counted as unpriced, never as costing 0.

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
UNMETERED = "llm_gateway_spend_unmetered_attempts"
GROUPS = ("caller", "route", "provider", "model", "currency")

SpendKey = tuple[str, str, str, str, str]  # caller, route, provider, model, currency ("" unpriced)


class SpendLedger:
    """The counts behind the spend metrics; updated by the access-log receiver, one entry per
    answer that reported usage: one dictionary lookup and five additions."""

    FIELDS = 6  # requests, input, output, cached input tokens, cost (pico-units), unmetered attempts

    def __init__(self, registry: CollectorRegistry | None = None, clock: Any = time.time):
        self.since = clock()
        # per capped key: requests, input, output, cached input tokens, cost (pico-units), unmetered attempts
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

    def unmetered(self, key: SpendKey) -> None:
        """An attempt that reached the provider and ended without a usage report."""
        self.entry(key)[5] += 1

    def _new(self, key: SpendKey) -> list[int]:
        caller, route, provider, model, currency = key
        capped = (self._capped(self._callers, caller, MAX_CALLERS), route, provider,
                  self._capped(self._models, model, MAX_MODELS), currency)
        entry = self.entries.get(capped)
        if entry is None:
            entry = self.entries[capped] = [0] * self.FIELDS
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
        unmetered = CounterMetricFamily(UNMETERED, "Attempts that reached a provider and ended without a usage "
                                                   "report (timeout, reset, cut stream, client gone, no usage): "
                                                   "the provider may have billed them", labels=LABELS)
        for key, entry in list(self.entries.items()):
            labels = list(key)
            if entry[5]:
                unmetered.add_metric(labels, entry[5])
            if not entry[0]:
                continue
            requests.add_metric(labels, entry[0])
            for kind, value in (("input", entry[1]), ("output", entry[2]), ("cached_input", entry[3])):
                tokens.add_metric([*labels, kind], value)
            if labels[4]:
                cost.add_metric(labels, entry[4] / PICO)
        yield from (requests, tokens, cost, unmetered)


# What one (caller, route, provider, model, currency) spent, as the report adds it up: requests,
# input, output, cached input tokens, the cost in units of the currency (exact), unmetered attempts.
Counts = tuple[int, int, int, int, Decimal, int]
_TOKEN_FIELDS = {"input": 1, "output": 2, "cached_input": 3}


def check_groups(by: Sequence[str]) -> None:
    unknown = [g for g in by if g not in GROUPS]
    if unknown:
        raise ValueError(f"cannot group by {', '.join(unknown)}: use {', '.join(GROUPS[:4])}")


def spend_report(families: Iterable[Metric], by: Sequence[str] = ("caller", "model", "route"),
                 since: float | None = None) -> dict[str, Any]:
    """The spend counters (of one process, or summed over workers) as a report (`report_of`)."""
    check_groups(by)
    sums: dict[SpendKey, list[Any]] = {}

    def counts(labels: dict[str, str]) -> list[Any]:
        key: SpendKey = (labels.get("llm_caller", ""), labels.get("llm_route", ""), labels.get("llm_provider", ""),
                         labels.get("gen_ai_request_model", ""), labels.get("currency", ""))
        found = sums.get(key)
        if found is None:
            found = sums[key] = [0, 0, 0, 0, Decimal(0), 0]
        return found

    for family in families:
        for sample in family.samples:
            if sample.name == REQUESTS + "_total":
                counts(sample.labels)[0] += int(sample.value)
            elif sample.name == TOKENS + "_total":
                field = _TOKEN_FIELDS.get(sample.labels.get("gen_ai_token_type", ""))
                if field is not None:
                    counts(sample.labels)[field] += int(sample.value)
            elif sample.name == COST + "_total":
                counts(sample.labels)[4] += Decimal(repr(sample.value))
            elif sample.name == UNMETERED + "_total":
                counts(sample.labels)[5] += int(sample.value)
    return report_of(((key, (c[0], c[1], c[2], c[3], c[4], c[5])) for key, c in sums.items()), by,
                     _iso(since) if since is not None else None, "process")


def report_of(counted: Iterable[tuple[SpendKey, Counts]], by: Sequence[str], since: str | None,
              source: str) -> dict[str, Any]:
    """What was spent as a report: totals per currency, what is unpriced, the unmetered attempts,
    and one row per group of `by` (a subset of caller, route, provider, model; currency is
    always kept apart). Costs are decimal strings. `source`: where the counts come from
    ("process": this process since it started; "redis": every instance sharing Redis)."""
    check_groups(by)
    keep = [GROUPS.index(g) for g in by if g != "currency"]
    rows: dict[tuple[str, ...], dict[str, Any]] = {}
    for values, (requests, prompt, completion, cached, cost, unmetered) in counted:
        group = tuple(values[i] for i in keep) + (values[4],)
        found = rows.get(group)
        if found is None:
            found = rows[group] = {**{GROUPS[i]: values[i] for i in keep}, "currency": values[4] or None,
                                   "requests": 0, "input_tokens": 0, "output_tokens": 0, "cached_input_tokens": 0,
                                   "cost": Decimal(0) if values[4] else None, "unmetered_attempts": 0}
        found["requests"] += requests
        found["input_tokens"] += prompt
        found["output_tokens"] += completion
        found["cached_input_tokens"] += cached
        found["unmetered_attempts"] += unmetered
        if values[4]:
            found["cost"] += cost
    totals: dict[str, Decimal] = {}
    unpriced = {"requests": 0, "input_tokens": 0, "output_tokens": 0}
    out_rows = []
    unmetered_total = 0
    for found in sorted(rows.values(), key=lambda r: (r["currency"] or "", -(r["cost"] or 0), -r["requests"])):
        unmetered_total += found["unmetered_attempts"]
        if found["currency"]:
            totals[found["currency"]] = totals.get(found["currency"], Decimal(0)) + found["cost"]
            found["cost"] = _amount(found["cost"])
        else:
            for name in unpriced:
                unpriced[name] += found[name]
        out_rows.append(found)
    return {"source": source, "since": since, "by": list(by),
            "totals": [{"currency": c, "cost": _amount(v)} for c, v in sorted(totals.items())],
            "unpriced": unpriced, "unmetered_attempts": unmetered_total, "rows": out_rows}


def _amount(value: Decimal) -> str:
    """A cost as text: rounded to the pico-unit, no exponent, no trailing zeros."""
    text = f"{value.quantize(Decimal(1).scaleb(-12)):f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def format_report(report: dict[str, Any]) -> str:
    """The report as a table for a terminal (`extproc spend`)."""
    by = [g for g in report["by"] if g != "currency"]
    header = [*by, "currency", "requests", "input", "output", "cached", "cost", "unmetered"]
    lines = [[*(str(r.get(g) or "-") for g in by), r["currency"] or "unpriced", str(r["requests"]),
              str(r["input_tokens"]), str(r["output_tokens"]), str(r["cached_input_tokens"]), r["cost"] or "-",
              str(r.get("unmetered_attempts", 0))]
             for r in report["rows"]]
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(header)]
    where = {"redis": "every instance sharing Redis", "process": "this gateway process"}.get(
        report.get("source", ""), "the gateway")
    out = [f"spend since {report['since'] or 'start'}, by {where}"]
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    out += ["  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)) for line in lines]
    for total in report["totals"]:
        out.append(f"total {total['currency']}: {total['cost']}")
    unpriced = report["unpriced"]
    if unpriced["requests"]:
        out.append(f"unpriced: {unpriced['requests']} requests, {unpriced['input_tokens']} input and "
                   f"{unpriced['output_tokens']} output tokens (no LLMPriceTable prices their model)")
    if report.get("unmetered_attempts"):
        out.append(f"unmetered: {report['unmetered_attempts']} attempts reached a provider and ended without a usage "
                   "report (timeouts, resets, cut streams, clients gone): the provider may have billed them")
    return "\n".join(out)
