"""extproc.telemetry.fast_series against prometheus-client itself: the same observations give the same
exposition, byte for byte (bucket bounds, `le` on a bound, +Inf, sums, counters' `_total`)."""

from __future__ import annotations

import prometheus_client
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest

from extproc.telemetry import fast_series as series

prometheus_client.disable_created_metrics()  # as extproc.telemetry.metrics does: no `_created` series

BOUNDS = (0.01, 0.1, 1, 10, 1024)
values = st.one_of(st.sampled_from([0, *BOUNDS, 1e9]), st.floats(0, 2000, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(observations=st.lists(st.tuples(st.sampled_from(["a", "b"]), values), max_size=40),
       increments=st.lists(st.tuples(st.sampled_from(["ok", "error"]), st.integers(1, 5)), max_size=10))
def test_same_exposition_as_prometheus_client(observations, increments):
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    made = [(prometheus_client.Histogram("h_seconds", "help", ("k",), buckets=BOUNDS, registry=theirs),
             prometheus_client.Counter("r", "help r", ("outcome",), registry=theirs)),
            (series.Histogram("h_seconds", "help", ("k",), buckets=BOUNDS, registry=ours),
             series.Counter("r", "help r", ("outcome",), registry=ours))]
    for histogram, counter in made:
        for label, value in observations:
            histogram.labels(label).observe(value)
        for outcome, n in increments:
            counter.labels(outcome).inc(n)
    assert generate_latest(ours) == generate_latest(theirs)


def test_labels_must_be_complete():
    with pytest.raises(ValueError):
        series.Counter("c", "help", ("a", "b"), CollectorRegistry()).labels("only one")


def test_a_name_is_registered_once():
    registry = CollectorRegistry()
    series.Counter("c", "help", (), registry)
    with pytest.raises(ValueError):
        series.Counter("c", "help", (), registry)
