"""Which namespaces' workloads may use an LLMProvider or LLMRoute (`spec.exportTo`, as Istio's)."""

from __future__ import annotations

from collections.abc import Iterable


def visible_to(namespace: str, export_to: Iterable[str] | None, home: str | None) -> frozenset[str] | None:
    """The namespaces whose workloads may use an object of `namespace` (None: every namespace).
    Default: its own namespace; every namespace for objects in the control plane's namespace.
    `spec.exportTo` replaces the default: `*` every namespace, `.` its own, or names."""
    if export_to is None:
        return None if namespace == home else frozenset({namespace})
    names: set[str] = set()
    for entry in export_to:
        if entry == "*":
            return None
        names.add(namespace if entry == "." else entry)
    return frozenset(names)


def may_use(caller_namespace: str | None, visible: frozenset[str] | None) -> bool:
    """A caller without a namespace is the gateway's own Envoy (local mode): it may use everything."""
    return caller_namespace is None or visible is None or caller_namespace in visible
