"""The gRPC health check a draining server answers."""

from __future__ import annotations

import pytest

from extproc.dataplane.health_check import HealthCheck


@pytest.mark.parametrize(("serving", "answer"), [(True, b"\x08\x01"), (False, b"\x08\x02")])
def test_health_check_says_not_serving_while_draining(serving, answer):
    assert HealthCheck(lambda: serving).on_message(b"") == (answer, True)
