"""W3C trace context: a client's traceparent continued, malformed ones replaced, attempts' ids
derived, sampling as OTEL_TRACES_SAMPLER says."""

from __future__ import annotations

import random

import pytest

from extproc.telemetry.trace_context import Sampler, attempt_span_id, parse_traceparent, sampler_from_env, traceparent

CLIENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.parametrize("value, parsed", [
    (CLIENT, ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)),
    (CLIENT[:-2] + "00", ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", False)),
    (CLIENT.upper().encode(), ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)),
    ("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-future", ("4bf92f3577b34da6a3ce929d0e0e4736",
                                                                        "00f067aa0ba902b7", True)),
    (CLIENT + "-extra", None),  # version 00 has exactly four parts
    ("ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", None),
    ("00-00000000000000000000000000000000-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01", None),
    ("00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01", None),
    ("", None), (None, None),
])
def test_parse_traceparent(value, parsed):
    assert parse_traceparent(value) == parsed


def test_attempt_span_ids_are_distinct_stable_and_never_zero():
    ids = {attempt_span_id("00f067aa0ba902b7", n) for n in range(1, 50)}
    assert len(ids) == 49 and all(len(i) == 16 and i != "0" * 16 for i in ids)
    assert attempt_span_id("00f067aa0ba902b7", 2) == attempt_span_id("00f067aa0ba902b7", 2)
    assert traceparent("a" * 32, "b" * 16) == f"00-{'a' * 32}-{'b' * 16}-01"


def test_a_client_trace_is_continued_and_a_missing_one_started():
    context = Sampler().start(CLIENT, random.Random(1))
    assert context.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and context.parent_span_id == "00f067aa0ba902b7"
    assert context.span_id != context.parent_span_id
    fresh = Sampler().start(b"garbage", random.Random(1))
    assert len(fresh.trace_id) == 32 and fresh.parent_span_id == ""


@pytest.mark.parametrize("env, client, sampled", [
    ({}, CLIENT, True), ({}, CLIENT[:-2] + "00", False), ({}, None, True),
    ({"OTEL_TRACES_SAMPLER": "always_off"}, None, False),
    ({"OTEL_TRACES_SAMPLER": "always_on"}, CLIENT[:-2] + "00", True),  # not parent based: the client does not count
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, CLIENT, True),
    ({"OTEL_TRACES_SAMPLER": "parentbased_always_off"}, None, False),
    ({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0"}, None, False),
])
def test_sampling_follows_the_standard_variables(env, client, sampled):
    assert (sampler_from_env(env).start(client) is not None) is sampled


def test_a_ratio_samples_about_its_share():
    sampler = sampler_from_env({"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"})
    draw = random.Random(7)
    share = sum(sampler.start(None, draw) is not None for _ in range(4000)) / 4000
    assert 0.2 < share < 0.3
