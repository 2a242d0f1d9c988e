"""The drain's plan: how long health checks say NOT_SERVING, then how long streams in flight may
still take."""

from __future__ import annotations

import pytest

from extproc.ops.drain import drain_plan


@pytest.mark.parametrize(("grace", "notice", "expected"), [
    pytest.param(25.0, 3.0, (3.0, 22.0), id="default"),
    pytest.param(2.0, 3.0, (1.0, 1.0), id="a-short-grace-halves"),
])
def test_drain_plan(grace, notice, expected):
    assert drain_plan(grace, notice) == expected
