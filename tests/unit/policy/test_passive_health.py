"""Passive health: a provider cools down after consecutive failures and is tried again after its
period; what each attempt in Envoy's access log says about its provider, counted and fed to it."""

from __future__ import annotations

import pytest

from extproc.policy.passive_health import PassiveHealth


def test_passive_health_cools_down_after_consecutive_failures_and_recovers():
    h = PassiveHealth({"a": (3, 10.0)})
    assert not h.failed("a", 0) and not h.failed("a", 1)
    h.succeeded("a")  # a success in between: the count starts again
    assert not h.failed("a", 2) and not h.failed("a", 3)
    assert h.failed("a", 4)  # third in a row
    assert "a" in h.cooling(5) and h.gauge(5) == {"a": True}
    assert h.cooling(14.5) == {}  # the period is over: tried again
    assert h.failed("a", 15)  # one more failure cools it down again
    assert "a" in h.cooling(16)
    h.succeeded("a")
    assert h.cooling(17) == {} and h.gauge(17) == {"a": False}


def test_unknown_provider_uses_the_default_thresholds():
    h = PassiveHealth()
    assert [h.failed("x", 0) for _ in range(3)] == [False, False, True]


def _entry(cluster: str, status: int, attempt: int = 1, request_id: str = "r1", upstream: bool = False, **flags):
    from envoy.data.accesslog.v3 import accesslog_pb2

    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = cluster
    common.upstream_request_attempt_count = attempt
    common.access_log_type = accesslog_pb2.AccessLogType.Value("UpstreamEnd" if upstream else "DownstreamEnd")
    for name, value in flags.items():
        if name == "failure":
            common.upstream_transport_failure_reason = value
        else:
            setattr(common.response_flags, name, value)
    if status:
        entry.response.response_code.value = status
    entry.request.request_id = request_id
    return entry


@pytest.mark.parametrize("status, flags, reason", [
    (503, {}, "503"),
    (429, {}, "429"),
    (0, {"upstream_connection_failure": True}, "connect_failure"),
    (503, {"no_healthy_upstream": True}, "address_unknown"),  # its name has not resolved (yet)
    (0, {"upstream_connection_failure": True,
         "failure": "TLS_error:|268435581:SSL routines:CERTIFICATE_VERIFY_FAILED"}, "tls"),
    (0, {"upstream_request_timeout": True}, "timeout"),
    (0, {"upstream_remote_reset": True}, "reset"),
    (0, {}, "no_answer"),
])
def test_attempt_reason(status, flags, reason):
    from extproc.policy.passive_health import attempt_reason

    assert attempt_reason(_entry("c", status, upstream=True, **flags)) == reason


def test_observer_counts_failovers_and_feeds_passive_health():
    from prometheus_client import CollectorRegistry

    from extproc.policy.passive_health import AttemptObserver

    registry = CollectorRegistry()
    health = PassiveHealth({"a.example.com": (2, 30.0)})
    observer = AttemptObserver(health, registry, clock=lambda: 100.0,
                                hosts=lambda: {"llm_provider_a_example_com": "a.example.com",
                                               "llm_provider_b_example_com": "b.example.com"})
    # request r1: A fails (503), B answers
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r1", upstream=True))
    observer.observe(_entry("llm_provider_b_example_com", 200, 2, "r1"))
    # request r2: A fails again and nothing else was tried
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r2", upstream=True))
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r2"))
    value = lambda name, **labels: registry.get_sample_value(name, labels)  # noqa: E731
    assert value("llm_gateway_failovers_total", provider="a.example.com", reason="503") == 1
    assert value("llm_gateway_provider_attempts_total", provider="a.example.com", result="503") == 2
    assert value("llm_gateway_provider_attempts_total", provider="b.example.com", result="ok") == 1
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 1  # two in a row
    # an answer from A (a 4xx is the client's fault) clears it
    observer.observe(_entry("llm_provider_a_example_com", 400, 1, "r3"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 0


def test_a_request_without_an_attempt_order_is_its_own_attempt():
    """Envoy logs attempts apart only for requests with an attempt order; a request of a rule
    without `retries` made one attempt, read from the request's own entry. A client that left
    (no status) says nothing about the provider."""
    from prometheus_client import CollectorRegistry

    from extproc.policy.passive_health import AttemptObserver

    registry = CollectorRegistry()
    health = PassiveHealth({"a.example.com": (2, 30.0)})
    observer = AttemptObserver(health, registry, clock=lambda: 100.0,
                                hosts=lambda: {"llm_provider_a_example_com": "a.example.com"})
    value = lambda name, **labels: registry.get_sample_value(name, labels)  # noqa: E731
    observer.observe(_entry("llm_provider_a_example_com", 0, 1, "r0"))  # the client left
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r1"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 0
    observer.observe(_entry("llm_provider_a_example_com", 0, 1, "r2", upstream_connection_failure=True))
    assert value("llm_gateway_provider_attempts_total", provider="a.example.com", result="503") == 1
    assert value("llm_gateway_provider_attempts_total", provider="a.example.com", result="no_answer") is None
    assert value("llm_gateway_failovers_total", provider="a.example.com", reason="503") is None  # nothing failed over
    observer.observe(_entry("llm_provider_a_example_com", 502, 1, "r3"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 1  # two in a row
    observer.observe(_entry("llm_provider_a_example_com", 200, 1, "r4"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 0
