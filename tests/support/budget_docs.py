"""Budgets (LLMTokenRateLimit) for the tests of the gate: the object as a dict, two rules (subscribers
and everyone else), a fake clock, a request's headers, a gate on them, and the access-log entry of
an admitted request's answer."""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import CollectorRegistry

from extproc.policy.budget_gate import BudgetGate
from extproc.policy.budgets import bucket_id
from support.manifests import DASHSCOPE, load_docs, provider


def budget_doc(rules: list[dict], name: str = "per-user", host: str = DASHSCOPE, key: str | None = "x-user-id") -> dict:
    spec: dict = {"host": host, "rules": rules}
    if key:
        spec["key"] = {"header": key}
    return {"apiVersion": "llm-gateway.dev/v1alpha1", "kind": "LLMTokenRateLimit",
            "metadata": {"name": name}, "spec": spec}


RULES = [{"name": "subscribers", "matches": [{"headers": {"user-type": {"exact": "subscriber"}}}],
          "tokens": 100000, "requests": 600, "per": "1h"},
         {"name": "everyone", "tokens": 40, "per": "1h"}]


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def headers(**values: str) -> dict[str, bytes]:
    return {k.replace("_", "-"): v.encode() for k, v in values.items()}


def buckets_of(meta: dict) -> list[str]:
    return meta.get("budget_buckets") or [bucket_id(meta["budget"], meta["budget_rule"], meta["budget_key"])]


def admit(gate, hdrs) -> dict:
    return gate.admit(gate.route, hdrs).as_dict()


def answered_entry(meta: dict, total_tokens: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """The access-log entry of a provider's 200 to a request admitted with `meta`."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.response.response_code.value = 200
    e.response.response_code_details = "via_upstream"
    e.common_properties.metadata.filter_metadata["llm_gateway"].update({**meta, "total_tokens": total_tokens})
    return e


def make_gate(tmp_path) -> BudgetGate:
    """A gate for DashScope's route with RULES, on a fake clock (`gate.clock`); `gate.route` is the
    route it limits."""
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES))
    clock = Clock()
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table, clock=clock)
    g.clock = clock
    g.route = compiled.table.route_for(DASHSCOPE).name
    return g
