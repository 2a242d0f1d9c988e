"""Budgets (LLMTokenRateLimit), their pure decisions: the arithmetic, the admission answer and its
headers, what a request is charged, and the buckets' names. Table tests."""

from __future__ import annotations

import pytest

from extproc.policy.budgets import (
    BudgetRefused,
    BudgetRule,
    admission,
    bucket_id,
    drained,
    key_hash,
    most_restrictive,
    openai_duration,
    parse_bucket_id,
    tokens_to_charge,
)

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
    ("provider_error", 17, 8, 9, 17),  # an error that reported usage was billed: charged
    ("provider_error", None, None, None, 0),  # most errors report none: nothing
    ("client_cancelled", 17, None, None, 17),  # the usage event came before the client left
    ("rejected", None, None, None, 0),
    ("gateway_error", 17, None, None, 0),  # the gateway's own answer: never a provider's usage
])
def test_tokens_to_charge(outcome, total, prompt, completion, charge):
    assert tokens_to_charge(outcome, total, prompt, completion) == charge


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
