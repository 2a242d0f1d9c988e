"""Body memory: a cap on the body bytes held at once, and the free heap given back once a big
burst is over."""

from __future__ import annotations

import pytest

from extproc.policy.body_memory import TRIM_AFTER_BYTES, Inflight


@pytest.mark.parametrize(("cap", "takes", "held", "refused"), [
    pytest.param(100, [60, 40], 100, 0, id="up-to-the-cap"),
    pytest.param(100, [60, 41], 60, 1, id="one-byte-over-is-refused"),
    pytest.param(100, [101, 10], 10, 1, id="a-big-one-refused-a-small-one-after-it-admitted"),
    pytest.param(100, [0, 0], 0, 0, id="nothing-held"),
])
def test_take_admits_up_to_the_cap(cap, takes, held, refused):
    inflight = Inflight(cap)
    for size in takes:
        inflight.take(size)
    assert (inflight.held, inflight.refused) == (held, refused)


@pytest.mark.parametrize(("burst", "trims"), [
    pytest.param([TRIM_AFTER_BYTES + 1], 1, id="a-big-burst-is-given-back"),
    pytest.param([TRIM_AFTER_BYTES // 2, TRIM_AFTER_BYTES // 2 + 1], 1, id="many-bodies-make-a-big-burst"),
    pytest.param([TRIM_AFTER_BYTES], 0, id="a-small-burst-stays-warm"),
])
def test_free_heap_is_given_back_once_a_big_burst_is_over(burst, trims):
    calls = []
    inflight = Inflight(1 << 40, trim=lambda: calls.append(1))
    for size in burst:
        assert inflight.take(size)
    for size in burst[:-1]:
        inflight.give_back(size)
        assert calls == []  # not while bytes are still held
    inflight.give_back(burst[-1])
    assert len(calls) == trims
