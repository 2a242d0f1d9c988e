"""The budget gate (LLMTokenRateLimit's in-process counts), with a fake clock: rule and key
selection, admission and charging, what it keeps and forgets, Redis away, and the metadata and
cached answers it gives. Budgets' pure decisions: policy/test_budgets.py."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from extproc.dataplane.accesslog_receiver import charge_budgets
from extproc.errors import GatewayError
from extproc.policy.budget_gate import BudgetGate, answer_key, redacted_url
from extproc.policy.budgets import BudgetRefused, BudgetRule, admission, key_hash
from extproc.telemetry.access_entries import record_from_entry
from support.budget_docs import RULES, Clock, admit, answered_entry, buckets_of, budget_doc, headers, make_gate
from support.manifests import DASHSCOPE, load_docs, provider


def test_safe_url_hides_the_password():
    assert redacted_url("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redacted_url("redis://:s3cret@redis") == "redis://:***@redis"
    assert redacted_url("redis://redis:6379") == "redis://redis:6379"


@pytest.fixture
def gate(tmp_path):
    return make_gate(tmp_path)


def test_gate_admits_until_charged_past_zero_then_refuses_per_key(gate):
    meta = admit(gate, headers(x_user_id="alice"))
    assert (meta["budget"], meta["budget_rule"], meta["budget_key"]) == ("default/per-user", "everyone",
                                                                        key_hash("alice"))
    assert meta["ratelimit_remaining_tokens"] == "40" and "ratelimit_limit_requests" not in meta
    for _ in range(3):
        gate.charge(buckets_of(meta), 17)
    with pytest.raises(BudgetRefused) as refused:
        admit(gate, headers(x_user_id="alice"))
    assert dict(refused.value.headers)["retry-after"] == "991"
    assert admit(gate, headers(x_user_id="bob"))["ratelimit_remaining_tokens"] == "40"
    assert admit(gate, headers())["budget_key"] == key_hash("")  # no header: the "" budget
    gate.clock.now += 991  # refilled past zero (exactly zero is not above it)
    assert admit(gate, headers(x_user_id="alice"))["ratelimit_remaining_tokens"] == "0"


def test_gate_counts_requests_at_admission(gate):
    for left in ("599", "598"):
        meta = admit(gate, headers(x_user_id="alice", user_type="subscriber"))
        assert meta["budget_rule"] == "subscribers" and meta["ratelimit_remaining_requests"] == left


def test_gate_works_decisions_out_again_for_a_new_table(tmp_path):
    """The gate keeps which rule a set of header values means, and the answer for a level: a
    new table (a bigger budget, a rule gone) must be decided afresh, not from what was kept."""
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    small = load_docs(tmp_path / "a", provider("dashscope", DASHSCOPE), budget_doc(RULES))
    bigger = load_docs(tmp_path / "b", provider("dashscope", DASHSCOPE),
                       budget_doc([{"name": "everyone", "tokens": 400, "per": "1h"}]))
    holder = [small.table]
    g = BudgetGate(CollectorRegistry(), lambda: holder[0], clock=Clock())
    route = small.table.route_for(DASHSCOPE).name
    subscriber = headers(x_user_id="alice", user_type="subscriber")
    assert g.admit(route, subscriber).as_dict()["budget_rule"] == "subscribers"
    assert g.admit(route, headers(x_user_id="alice")).as_dict()["ratelimit_limit_tokens"] == "40"
    holder[0] = bigger.table
    assert g.admit(route, subscriber).as_dict()["budget_rule"] == "everyone"  # its rule is gone
    assert g.admit(route, headers(x_user_id="alice")).as_dict()["ratelimit_limit_tokens"] == "400"


def test_gate_other_route_is_not_limited(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), provider("other", "other.example.com"),
                         budget_doc(RULES))
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table)
    assert g.admit(compiled.table.route_for("other.example.com").name, headers(x_user_id="alice")) is None


def test_gate_charge_for_a_removed_rule_is_skipped(gate):
    gate.charge(["llmgw:budget:default/gone:abc:everyone", "nonsense"], 17)  # no error, nothing charged
    assert [sample for family in gate.metrics.charged.collect() for sample in family.samples] == []


def test_gate_fail_closed_while_degraded(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES))
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table, redis_url="redis://127.0.0.1:1/0", fail_closed=True)
    route = compiled.table.route_for(DASHSCOPE).name
    g._set_up(False)  # a sync failed
    with pytest.raises(GatewayError) as error:
        g.admit(route, headers(x_user_id="a"))
    assert (error.value.status, error.value.code) == (503, "rate_limit_unavailable")
    assert "503" in g.degraded_reason()


def test_gate_unreachable_redis_keeps_what_is_owed(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES))
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table, redis_url="redis://127.0.0.1:1/0")
    route = compiled.table.route_for(DASHSCOPE).name
    g._set_up(False)  # a sync failed: admitted from memory (fail open), not waiting for Redis
    meta = g.admit(route, headers(x_user_id="a")).as_dict()
    g.charge(buckets_of(meta), 17)

    async def one_sync() -> bool:
        await g.start()
        g._task.cancel()
        try:
            return await g.sync()
        finally:
            await g.stop()

    assert asyncio.run(one_sync()) is False
    assert g.degraded and "per instance" in g.degraded_reason()
    assert g._pending[buckets_of(meta)[0]] == [17.0, 0.0]  # sent when Redis is back
    with pytest.raises(BudgetRefused):  # and this instance keeps limiting meanwhile
        g.charge(buckets_of(meta), 30)
        g.admit(route, headers(x_user_id="a"))


def test_gate_in_process_forgets_drained_buckets_only(gate):
    first = admit(gate, headers(x_user_id="a"))
    gate.charge(buckets_of(first), 17)
    gate.charge(buckets_of(admit(gate, headers(x_user_id="b"))), 40)
    gate.clock.now += 17 * 90 + 1  # a's 17 tokens drained (40 per hour), b's 40 not yet
    assert gate.forget_drained() == 1
    assert admit(gate, headers(x_user_id="b"))["ratelimit_remaining_tokens"] == "17"


def test_admitted_encodes_the_same_metadata_as_its_dict(gate):
    from google.protobuf import json_format, struct_pb2

    for _ in range(2):  # the second time from the gate's cached decision and answer
        admitted = gate.admit(gate.route, headers(x_user_id="alice", user_type="subscriber"))
        written = struct_pb2.Struct()
        written.fields["route"].string_value = "kept"
        written.MergeFromString(admitted.encoded())
        assert json_format.MessageToDict(written) == {"route": "kept", **admitted.as_dict()}
        assert written.fields["ratelimit_limit_requests"].string_value == "600"
    from extproc.policy.budget_gate import Admitted
    long = struct_pb2.Struct.FromString(  # lengths past one varint byte
        Admitted("ns/" + "n" * 200, "r" * 300, "k", admitted.answer, ["b" * 1000, "c"]).encoded())
    assert long.fields["budget_rule"].string_value == "r" * 300
    assert [v.string_value for v in long.fields["budget_buckets"].list_value.values] == ["b" * 1000, "c"]


def test_two_objects_on_one_host_are_both_charged_and_the_tighter_one_answers(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES),
                         budget_doc([{"name": "team", "tokens": 20, "per": "1h"}], name="per-team", key="x-team"))
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table)
    route = compiled.table.route_for(DASHSCOPE).name
    meta = g.admit(route, headers(x_user_id="alice", x_team="red")).as_dict()
    assert meta["budget"] == "default/per-team" and meta["ratelimit_limit_tokens"] == "20"
    assert len(meta["budget_buckets"]) == 2
    e = answered_entry(meta, total_tokens=25)
    owed: dict = {}
    charge_budgets(owed, e, record_from_entry(e))
    for buckets, tokens in owed.items():
        g.charge(buckets, tokens)
    with pytest.raises(BudgetRefused):  # the team's 20 are spent
        g.admit(route, headers(x_user_id="bob", x_team="red"))
    tighter = g.admit(route, headers(x_user_id="alice", x_team="blue")).as_dict()  # alice: 15 left, blue: 20
    assert (tighter["budget"], tighter["ratelimit_remaining_tokens"]) == ("default/per-user", "15")
    other = g.admit(route, headers(x_user_id="carol", x_team="blue")).as_dict()
    assert other["ratelimit_remaining_tokens"] == "20"  # per-team blue: untouched; alice's 25 on per-user
    assert g.admit(route, headers(x_user_id="alice", x_team="green")).answer.allowed
    from google.protobuf import json_format, struct_pb2

    for _ in range(2):  # the metadata of an admission by two objects, the second time from the kept identity
        admitted = g.admit(route, headers(x_user_id="carol", x_team="blue"))
        assert json_format.MessageToDict(struct_pb2.Struct.FromString(admitted.encoded())) == admitted.as_dict()


def test_gate_syncs_an_admitted_bucket_at_its_rules_rates(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES))
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table, redis_url="redis://127.0.0.1:1/0")
    route = compiled.table.route_for(DASHSCOPE).name
    g._set_up(False)  # admitted from memory (fail open)
    bucket = g.admit(route, headers(x_user_id="a")).buckets[0]  # admitted only, nothing charged yet
    assert g._rates[bucket] == (40 / 3600, 1 / 3600)  # what a sync sends Redis to drain with


ANSWER_KEY_RULES = [BudgetRule("t", (), tokens=40, per_s=3600.0),
                    BudgetRule("r", (), tokens=1000, per_s=60.0, requests=5),
                    BudgetRule("big", (), tokens=10**12, per_s=3600.0),
                    BudgetRule("fast", (), tokens=3, per_s=1.0, requests=1000)]


@settings(max_examples=400, deadline=None)
@given(rule=st.sampled_from(ANSWER_KEY_RULES), tokens=st.floats(0, 2000), requests=st.floats(0, 10),
       other_tokens=st.floats(0, 2000), other_requests=st.floats(0, 10))
def test_equal_answer_keys_mean_equal_answers(rule, tokens, requests, other_tokens, other_requests):
    """The gate works out an admission once per answer key: two levels with one key must get the
    same answer, headers included; a level that refuses has no key (never cached)."""
    first, second = admission(rule, tokens, requests), admission(rule, other_tokens, other_requests)
    key = answer_key(rule, tokens, requests)
    assert (key is None) == (not first.allowed)
    if key is not None and key == answer_key(rule, other_tokens, other_requests):
        assert first == second
    for level in (tokens, tokens / 7, tokens * 1e-6):  # near the same level, where keys often match
        near = answer_key(rule, level, requests)
        if key is not None and near == key:
            assert admission(rule, level, requests) == first
