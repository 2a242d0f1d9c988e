"""Budgets (LLMTokenRateLimit): the arithmetic, rule and key selection, the admission answer and its
headers, charging from the access log, and the config's problems. Table tests on pure decisions; the
gate (in-process counts) with a fake clock."""

from __future__ import annotations

import asyncio

import pytest
from envoy.data.accesslog.v3 import accesslog_pb2
from prometheus_client import CollectorRegistry

from extproc.dataplane.accesslog_receiver import charge_budgets
from extproc.telemetry.access_entries import record_from_entry
from extproc.policy.budget_gate import redacted_url, BudgetGate
from extproc.policy.budgets import admission, bucket_id, BudgetRefused, BudgetRule, drained, key_hash, most_restrictive, openai_duration, parse_bucket_id, tokens_to_charge
from extproc.cli.main import main
from extproc.config.models import parse_per
from extproc.config.problems import ConfigError
from extproc.errors import GatewayError
from support.manifests import DASHSCOPE, load_docs, provider, write

RULE = BudgetRule("everyone", (), tokens=40, per_s=3600.0)
WITH_REQUESTS = BudgetRule("everyone", (), tokens=40, per_s=60.0, requests=2)


@pytest.mark.parametrize(("used", "rate", "elapsed", "expected"), [
    (51.0, 40 / 3600, 0.0, 51.0),
    (51.0, 10.0, 1.0, 41.0),
    (51.0, 10.0, 10.0, 0.0),  # never below zero
    (5.0, 10.0, -3.0, 5.0),  # a clock that went back drains nothing
])
def test_drained(used, rate, elapsed, expected):
    assert drained(used, rate, elapsed) == pytest.approx(expected)


# (rule, used tokens, used requests) -> allowed, reason, retry after, remaining tokens, headers subset
@pytest.mark.parametrize(("rule", "tokens", "requests", "allowed", "reason", "retry", "headers"), [
    pytest.param(RULE, 0, 0, True, "", 0, {"x-ratelimit-limit-tokens": "40", "x-ratelimit-remaining-tokens": "40",
                                           "x-ratelimit-reset-tokens": "0s"}, id="fresh"),
    pytest.param(RULE, 34, 0, True, "", 0, {"x-ratelimit-remaining-tokens": "6",
                                            "x-ratelimit-reset-tokens": "51m0s"}, id="above-zero-admits"),
    pytest.param(RULE, 39.5, 0, True, "", 0, {"x-ratelimit-remaining-tokens": "0"}, id="half-a-token-left-admits"),
    pytest.param(RULE, 40, 0, False, "tokens", 1, {"x-ratelimit-remaining-tokens": "0"}, id="exactly-zero-refuses"),
    pytest.param(RULE, 51, 0, False, "tokens", 991, {"x-ratelimit-reset-tokens": "1h16m30s"}, id="overdrawn"),
    pytest.param(WITH_REQUESTS, 0, 0, True, "", 0, {"x-ratelimit-limit-requests": "2",
                                                    "x-ratelimit-remaining-requests": "1",
                                                    "x-ratelimit-reset-requests": "30s"}, id="first-request"),
    pytest.param(WITH_REQUESTS, 0, 1, True, "", 0, {"x-ratelimit-remaining-requests": "0"}, id="last-request"),
    pytest.param(WITH_REQUESTS, 0, 2, False, "requests", 30, {"x-ratelimit-remaining-requests": "0",
                                                              "x-ratelimit-reset-requests": "1m0s"},
                 id="third-request-refused"),
    pytest.param(WITH_REQUESTS, 0, 1.5, False, "requests", 15, {}, id="half-a-request-left-refuses"),
    pytest.param(WITH_REQUESTS, 50, 2, False, "requests", 30, {}, id="both-refuse-the-longer-wait"),
    pytest.param(WITH_REQUESTS, 50, 0, False, "tokens", 16, {}, id="tokens-wait-is-strict"),
])
def test_admission(rule, tokens, requests, allowed, reason, retry, headers):
    answer = admission(rule, tokens, requests)
    assert (answer.allowed, answer.reason, answer.retry_after_s) == (allowed, reason, retry)
    got = dict(answer.headers)
    for name, value in headers.items():
        assert got[name] == value, name
    assert ("x-ratelimit-limit-requests" in got) == (rule.requests is not None)


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.0201, "21ms"), (0.5, "500ms"), (1, "1s"), (1.2, "2s"), (59, "59s"), (60, "1m0s"),
    (361, "6m1s"), (3600, "1h0m0s"), (3723, "1h2m3s"),
])
def test_openai_duration(seconds, text):
    assert openai_duration(seconds) == text


@pytest.mark.parametrize(("outcome", "total", "prompt", "completion", "charge"), [
    ("success", 17, 8, 9, 17),
    ("success", None, 8, 9, 17),  # no total: prompt + completion
    ("success", None, None, None, 0),  # no usage at all
    ("provider_error", 17, 8, 9, 0),  # a provider error charges nothing
    ("client_cancelled", 17, None, None, 0),
    ("rejected", None, None, None, 0),
])
def test_tokens_to_charge(outcome, total, prompt, completion, charge):
    assert tokens_to_charge(outcome, total, prompt, completion) == charge


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1), ("90s", 90), ("1m", 60), ("1h", 3600), ("30d", 2592000),
                                               ("1500ms", 1.5)])
def test_parse_per(text, seconds):
    assert parse_per(text) == seconds


def test_bucket_id_round_trip_keeps_a_rule_name_with_colons():
    bucket = bucket_id("ns/obj", "tier: gold", key_hash("alice"))
    assert parse_bucket_id(bucket) == ("ns/obj", "tier: gold", key_hash("alice"))
    assert "alice" not in bucket
    assert parse_bucket_id("other:thing") is None


def test_most_restrictive_prefers_refusal_then_fewest_tokens():
    a, b, refused = admission(RULE, 10, 0), admission(RULE, 30, 0), admission(RULE, 45, 0)
    assert most_restrictive([a, b]) is b
    assert most_restrictive([a, refused, b]) is refused


def test_refusal_is_openai_shaped_429():
    error = BudgetRefused("default/per-user", "everyone", admission(RULE, 51, 0))
    assert error.status == 429 and error.code == "rate_limit_exceeded"
    assert dict(error.headers)["retry-after"] == "991"
    import json
    assert json.loads(error.body())["error"] == {"message": error.message, "type": "tokens", "param": None,
                                                 "code": "rate_limit_exceeded"}


def test_safe_url_hides_the_password():
    assert redacted_url("redis://user:s3cret@redis:6379/0") == "redis://user:***@redis:6379/0"
    assert redacted_url("redis://:s3cret@redis") == "redis://:***@redis"
    assert redacted_url("redis://redis:6379") == "redis://redis:6379"


# --- the gate, in process, with a fake clock ---------------------------------------------------

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


@pytest.fixture
def gate(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES))
    clock = Clock()
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table, clock=clock)
    g.clock = clock
    g.route = compiled.table.route_for(DASHSCOPE).name
    return g


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


@pytest.mark.parametrize(("rules", "expected"), [
    (None, set()),  # no budget: no header formatted for any answer
    ([{"name": "everyone", "tokens": 40, "per": "1h"}],
     {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"}),
    (RULES, {"x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
             "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"}),
])
def test_routes_carry_only_the_rate_limit_headers_a_config_can_give(tmp_path, rules, expected):
    from extproc.policy.budgets import response_headers
    from extproc.envoy.routes import route_configuration

    docs = [provider("dashscope", DASHSCOPE)] + ([budget_doc(rules)] if rules else [])
    names = response_headers(load_docs(tmp_path, *docs).table.budgets)
    assert names == expected
    vhost = route_configuration([DASHSCOPE], budget_headers=names)["virtual_hosts"][0]
    assert {h["header"]["key"] for h in vhost.get("response_headers_to_add", [])} == expected


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
    assert g.admit(route, headers(x_user_id="a")).as_dict()["budget"] == "default/per-user"
    g._set_up(False)
    with pytest.raises(GatewayError) as error:
        g.admit(route, headers(x_user_id="a"))
    assert (error.value.status, error.value.code) == (503, "rate_limit_unavailable")
    assert "503" in g.degraded_reason()


def test_gate_unreachable_redis_keeps_what_is_owed(tmp_path):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(RULES))
    g = BudgetGate(CollectorRegistry(), lambda: compiled.table, redis_url="redis://127.0.0.1:1/0")
    route = compiled.table.route_for(DASHSCOPE).name
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


def answered_entry(meta: dict, total_tokens: int) -> accesslog_pb2.HTTPAccessLogEntry:
    """The access-log entry of a provider's 200 to a request admitted with `meta`."""
    e = accesslog_pb2.HTTPAccessLogEntry()
    e.response.response_code.value = 200
    e.response.response_code_details = "via_upstream"
    e.common_properties.metadata.filter_metadata["llm_gateway"].update({**meta, "total_tokens": total_tokens})
    return e


def test_access_log_entry_charges_its_buckets(gate):
    meta = admit(gate, headers(x_user_id="alice"))
    e = answered_entry(meta, total_tokens=17)
    owed: dict = {}
    charge_budgets(owed, e, record_from_entry(e))
    charge_budgets(owed, e, record_from_entry(e))
    e.response.response_code.value = 500  # a provider error charges nothing
    charge_budgets(owed, e, record_from_entry(e))
    assert owed == {tuple(buckets_of(meta)): 34}
    owed[tuple(buckets_of(meta))] = 17
    for buckets, tokens in owed.items():
        gate.charge(buckets, tokens)
    assert admit(gate, headers(x_user_id="alice"))["ratelimit_remaining_tokens"] == "23"


# --- config ------------------------------------------------------------------------------------

@pytest.mark.parametrize(("doc", "message", "field"), [
    pytest.param(budget_doc([{"tokens": 0, "per": "1h"}]), "greater than or equal to 1", "spec.rules[0].tokens",
                 id="zero-tokens"),
    pytest.param(budget_doc([{"tokens": 10, "per": "31d"}]), "between 1s and 30d", "spec.rules[0].per", id="per-too-long"),
    pytest.param(budget_doc([{"tokens": 10, "per": "500ms"}]), "between 1s and 30d", "spec.rules[0].per",
                 id="per-too-short"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1 hour"}]), "should match pattern", "spec.rules[0].per",
                 id="per-not-a-duration"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h", "requests": 0}]), "greater than or equal to 1",
                 "spec.rules[0].requests", id="zero-requests"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h", "tokenz": 3}]), "unknown field", "spec.rules[0].tokenz",
                 id="typo"),
    pytest.param(budget_doc([]), "at least 1 item", "spec.rules", id="no-rules"),
    pytest.param(budget_doc([{"name": "a", "tokens": 1, "per": "1h"}, {"name": "a", "tokens": 1, "per": "1h"}]),
                 "rule names must be unique", "spec", id="duplicate-rule-names"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h"}], key="bad header"), "should match pattern",
                 "spec.key.header", id="bad-key-header"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h"}], host="nowhere.example.com"),
                 "no LLMRoute or LLMProvider serves host 'nowhere.example.com'", "spec.host", id="unknown-host"),
    pytest.param({**budget_doc([{"tokens": 10, "per": "1h"}]), "apiVersion": "istio.alibabacloud.com/v1beta1"},
                 "expected 'llm-gateway.dev/v1alpha1'", "apiVersion", id="wrong-group"),
])
def test_bad_budget_names_file_object_field(tmp_path, doc, message, field):
    with pytest.raises(ConfigError) as error:
        load_docs(tmp_path, provider("dashscope", DASHSCOPE), doc)
    text = "\n".join(str(p) for p in error.value.problems)
    assert message in text and f": {field}: " in text and "LLMTokenRateLimit default/per-user" in text
    assert "config.yaml" in text


def test_budget_on_route_alias_and_validate_route_commands(tmp_path, capsys):
    file = write(tmp_path / "c.yaml", provider("dashscope", DASHSCOPE, namespace="llm"),
                 {**budget_doc(RULES), "metadata": {"name": "per-user", "namespace": "llm"}})
    assert main(["validate", str(file)]) == 0
    assert "1 LLMTokenRateLimit" in capsys.readouterr().out
    assert main(["route", "--config", str(file), "--host", f"{DASHSCOPE}.llm", "-H", "x-user-id: alice"]) == 0
    out = capsys.readouterr().out
    assert f"budget llm/per-user: rule everyone: 40 tokens per 3600s, key {key_hash('alice')} (header x-user-id)" in out
    assert "alice" not in out


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
    bucket = g.admit(route, headers(x_user_id="a")).buckets[0]  # admitted only, nothing charged yet
    assert g._rates[bucket] == (40 / 3600, 1 / 3600)  # what a sync sends Redis to drain with
