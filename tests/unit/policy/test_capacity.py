"""How many requests the gateway holds: the limits and the descriptors they take."""

from __future__ import annotations

import pytest

from extproc.policy.capacity import (
    DEFAULT_MAX_STREAMS,
    DEFAULT_PROVIDER_LIMITS,
    ConnectionLimits,
    connections_within,
    descriptors_needed,
    streams_within,
)


def test_defaults_are_sized_for_llm_traffic_not_envoys_1024():
    assert DEFAULT_PROVIDER_LIMITS == ConnectionLimits(10_000, 10_000, 10_000)
    assert ConnectionLimits.streams(DEFAULT_MAX_STREAMS) == DEFAULT_PROVIDER_LIMITS


@pytest.mark.parametrize(("streams", "descriptors"), [(0, 1024), (1, 1026), (10_000, 21_024)])
def test_descriptors_two_per_stream_plus_a_reserve(streams, descriptors):
    assert descriptors_needed(streams) == descriptors
    assert streams_within(descriptors) == streams


@pytest.mark.parametrize(("descriptors", "streams", "connections"), [
    pytest.param(20_000, 9_488, 18_976, id="a-container's-20000"),
    pytest.param(1024, 0, 1, id="nothing-left-over-the-reserve"),
    pytest.param(100, 0, 1, id="below-the-reserve"),
])
def test_what_a_limit_holds(descriptors, streams, connections):
    assert streams_within(descriptors) == streams
    assert connections_within(descriptors) == connections
