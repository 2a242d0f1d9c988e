"""Fixtures of the end-to-end tests that need more than tests/conftest.py's."""

from __future__ import annotations

import pytest

from support.kube import started_api_server


@pytest.fixture(scope="module")
def kube(tmp_path_factory):
    """A real kube-apiserver of this run's own with the CRDs applied, for the test module that asks for it."""
    yield from started_api_server(tmp_path_factory)
