"""Leader election decisions (extproc.ops.leader): what a replica does with the Lease it reads."""

from __future__ import annotations

import pytest

from extproc.ops.leader import CREATE, RENEW, TAKE, WAIT, Seen, next_step

ME, OTHER = "me", "other"


@pytest.mark.parametrize(("holder", "renewed", "seen", "now", "step", "seen_after"), [
    pytest.param(None, "", None, 0.0, CREATE, None, id="no-lease-yet"),
    pytest.param(ME, "t1", None, 0.0, RENEW, None, id="ours-renew"),
    pytest.param("", "t1", Seen(OTHER, "t0", 0.0), 1.0, TAKE, None, id="released-take-at-once"),
    pytest.param(OTHER, "t1", None, 5.0, WAIT, Seen(OTHER, "t1", 5.0), id="first-look-starts-the-clock"),
    pytest.param(OTHER, "t2", Seen(OTHER, "t1", 0.0), 14.0, WAIT, Seen(OTHER, "t2", 14.0), id="renewed-alive"),
    pytest.param(OTHER, "t1", Seen(OTHER, "t1", 0.0), 14.9, WAIT, Seen(OTHER, "t1", 0.0),
                 id="unchanged-not-yet-expired"),
    pytest.param(OTHER, "t1", Seen(OTHER, "t1", 0.0), 15.0, TAKE, None, id="unchanged-for-the-duration-take"),
    pytest.param("third", "t1", Seen(OTHER, "t1", 0.0), 20.0, WAIT, Seen("third", "t1", 20.0), id="new-holder-alive"),
])
def test_next_step(holder, renewed, seen, now, step, seen_after):
    assert next_step(holder, renewed, ME, seen, now, 15.0) == (step, seen_after)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_leader_stops_claiming_before_anyone_can_take_over():
    """A leader that cannot renew stops writing after two thirds of the duration; another replica
    takes over only after the whole duration unchanged, so they never both write."""
    from extproc.ops.leader import LeaderElector

    clock = FakeClock()
    elector = LeaderElector("ns", duration_s=15.0, api=object(), clock=clock)
    elector._renewed_at = clock.now
    assert elector.is_leader()
    clock.now += 9.9
    assert elector.is_leader()
    clock.now += 0.1
    assert not elector.is_leader()
