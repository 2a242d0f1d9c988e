"""The Grafana dashboard (dashboards/llm-gateway.json) is built on what the gateway exports:
every query names metrics and labels a real data plane registers (with traces on), and covers
what the dashboard promises."""

from __future__ import annotations

import json
import re

from support.helpers import REPO

PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "le", "without", "avg"}
SUFFIXES = ("_bucket", "_sum", "_count", "_total")


def exported() -> dict[str, set[str]]:
    """Every sample name a data plane's registry exposes, with the label names of its family."""
    from extproc.ops.data_plane import DataPlane
    from extproc.policy.table import EMPTY_TABLE, TableHolder
    from extproc.telemetry.metrics import RequestRecord

    plane = DataPlane(TableHolder(EMPTY_TABLE), otlp_endpoint="http://127.0.0.1:9")  # traces on: their metrics too
    try:
        plane.metrics.observe(RequestRecord("ns/r", "rule", "ns/p", "host", "m", "m", True, 200, "success", "", 1.0,
                                            3, 4, 0.1, 0.01, "chat", 1, "USD", "", 10, "ns/caller"))
        plane.health.failed("host", 0.0)
        names: dict[str, set[str]] = {}
        for collector in list(plane.metrics.registry._collector_to_names):
            declared = set(getattr(collector, "labelnames", ()) or getattr(collector, "_labelnames", ()))
            for family in collector.collect():
                for sample in family.samples:
                    names.setdefault(sample.name, set()).update(declared | set(sample.labels))
                for suffix in ("", *SUFFIXES):
                    names.setdefault(family.name + suffix, set()).update(declared)
        return names
    finally:
        if plane.spans is not None:
            plane.spans.stop(0.1)


def queries() -> list[tuple[str, str]]:
    dashboard = json.loads((REPO / "dashboards" / "llm-gateway.json").read_text())
    return [(panel["title"], target["expr"]) for panel in dashboard["panels"] for target in panel["targets"]]


def metrics_and_labels(expr: str) -> tuple[set[str], set[str]]:
    bare = re.sub(r"\bby\s*\([^)]*\)|\{[^}]*\}|\[[^]]*\]", " ", expr)  # no groupings, selectors, ranges
    metrics = {m for m in re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", bare) if m not in PROMQL_WORDS}
    labels = set()
    for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
        labels.update(name.strip() for name in group.split(",") if name.strip())
    labels.update(re.findall(r"([a-z_][a-z0-9_]*)\s*(?:=~|!=|!~|=)\s*\"", expr))
    return metrics, labels - {"le"}


def test_every_query_names_a_metric_and_labels_the_gateway_exports():
    names = exported()
    checked = 0
    for title, expr in queries():
        metrics, labels = metrics_and_labels(expr)
        assert metrics, f"{title}: no metric in {expr}"
        for metric in metrics:
            assert metric in names, f"{title}: {metric} is not exported (see extproc/telemetry, extproc/policy)"
            assert labels <= names[metric], f"{title}: {metric} has no label {labels - names[metric]}"
            checked += 1
    assert checked >= 14


def test_the_check_catches_a_wrong_metric_or_label():
    names = exported()
    metrics, labels = metrics_and_labels('sum by (user) (rate(llm_gateway_requests_total{outcome="x"}[5m]))')
    assert metrics == {"llm_gateway_requests_total"} and labels == {"user", "outcome"}
    assert not labels <= names["llm_gateway_requests_total"]
    assert "llm_gateway_request_total" not in names


def test_the_dashboard_shows_what_it_promises():
    text = " ".join(expr for _, expr in queries())
    for metric in ("llm_gateway_requests_total", "error_type", "gen_ai_client_token_usage", "llm_gateway_cost_total",
                   "llm_caller", "gen_ai_request_model", "gen_ai_server_time_to_first_token_seconds",
                   "gen_ai_server_time_per_output_token_seconds", "llm_gateway_failovers_total",
                   "llm_gateway_budget_refused_total", "llm_gateway_provider_cooling_down"):
        assert metric in text, metric
    assert (REPO / "docs" / "images" / "dashboard.png").is_file()
