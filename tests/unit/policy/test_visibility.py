"""Which namespaces see a route or a provider (`exportTo`), and whether a caller may use it."""

from __future__ import annotations

import pytest

from extproc.policy.visibility import may_use, visible_to
from support.manifests import HOME


@pytest.mark.parametrize("namespace, export_to, visible", [
    ("team-a", None, frozenset({"team-a"})),
    (HOME, None, None),  # the control plane's namespace: everyone's
    ("team-a", ["."], frozenset({"team-a"})),
    ("team-a", [".", "team-b"], frozenset({"team-a", "team-b"})),
    ("team-a", ["team-b"], frozenset({"team-b"})),
    ("team-a", ["*"], None),
    (HOME, ["."], frozenset({HOME})),  # explicit exportTo narrows the default
    ("team-a", [], frozenset()),
])
def test_visible_to(namespace, export_to, visible):
    assert visible_to(namespace, export_to, HOME) == visible


@pytest.mark.parametrize("caller, visible, allowed", [
    (None, frozenset({"a"}), True), ("a", frozenset({"a"}), True), ("b", frozenset({"a"}), False),
    ("b", None, True), ("b", frozenset(), False),
])
def test_may_use(caller, visible, allowed):
    assert may_use(caller, visible) is allowed
