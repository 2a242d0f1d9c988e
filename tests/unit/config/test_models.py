"""The config's models: the values their fields accept."""

from __future__ import annotations

import pytest

from extproc.config.models import parse_per


@pytest.mark.parametrize(("text", "seconds"), [("1s", 1), ("90s", 90), ("1m", 60), ("1h", 3600), ("30d", 2592000),
                                               ("1500ms", 1.5)])
def test_parse_per(text, seconds):
    assert parse_per(text) == seconds
