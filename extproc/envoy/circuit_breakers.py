"""A cluster's circuit breakers in Envoy's form, from the gateway's limits
(`extproc.policy.capacity`): the one place the provider clusters and the control plane's
clusters get theirs from."""

from __future__ import annotations

from ..policy.capacity import ConnectionLimits


def circuit_breakers(limits: ConnectionLimits, max_retries: int | None = None) -> dict:
    """The `circuit_breakers` of a cluster: `limits` at the default priority (the only one the
    gateway uses), and `max_retries` retries in flight where given (Envoy's default is 3)."""
    threshold: dict = {
        "max_connections": limits.max_connections,
        "max_pending_requests": limits.max_pending_requests,
        "max_requests": limits.max_requests,
    }
    if max_retries is not None:
        threshold["max_retries"] = max_retries
    return {"thresholds": [threshold]}
