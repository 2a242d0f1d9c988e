"""Circuit breakers, the one form both the provider clusters and the control plane's take."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from google.protobuf import json_format

import support.envoy_api  # noqa: F401  (registers every @type the bootstrap uses)
from extproc.envoy.bootstrap import ACCESS_LOG_BUFFER_BYTES, BootstrapOptions, bootstrap
from extproc.envoy.circuit_breakers import circuit_breakers
from extproc.envoy.clusters import UpstreamOptions, provider_cluster, to_cluster_proto
from extproc.policy.capacity import DEFAULT_MAX_STREAMS, ConnectionLimits
from extproc.protocol import ACCESS_LOG_CLUSTER, CONTROL_CLUSTER, EXT_PROC_CLUSTER


def thresholds(cluster: dict) -> tuple[int, int, int, int | None]:
    (t,) = json_format.ParseDict(cluster, cluster_pb2.Cluster()).circuit_breakers.thresholds
    return (t.max_connections.value, t.max_pending_requests.value, t.max_requests.value,
            t.max_retries.value if t.HasField("max_retries") else None)


def test_limits_in_envoys_form():
    assert circuit_breakers(ConnectionLimits(1, 2, 3)) == {"thresholds": [
        {"max_connections": 1, "max_pending_requests": 2, "max_requests": 3}]}
    assert circuit_breakers(ConnectionLimits(1, 2, 3), max_retries=7)["thresholds"][0]["max_retries"] == 7


@pytest.mark.parametrize(("limits", "failover", "expected"), [
    pytest.param(ConnectionLimits(), False, (10_000, 10_000, 10_000, None), id="default"),
    pytest.param(ConnectionLimits(50, 60, 70), False, (50, 60, 70, None), id="connection-pool"),
    pytest.param(ConnectionLimits(50, 60, 70), True, (50, 60, 70, 100_000), id="failover-twin-same-limits"),
])
def test_provider_clusters_admit_their_limits(limits, failover, expected):
    cluster = provider_cluster("llm_provider_x", "x.example", UpstreamOptions(), failover=failover, limits=limits)
    assert thresholds(cluster) == expected
    to_cluster_proto(cluster)  # valid Envoy API


@pytest.mark.parametrize("socket_dir", ["/run/gw", None])
def test_control_plane_clusters_take_the_flag_and_the_access_log_has_its_own(socket_dir):
    boot = bootstrap(BootstrapOptions(socket_dir=socket_dir, max_ext_proc_streams=123))
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    for name in (CONTROL_CLUSTER, EXT_PROC_CLUSTER, ACCESS_LOG_CLUSTER):
        assert thresholds(clusters[name]) == (123, 123, 123, None)
    # the same server, a cluster apart: the ext_proc's limit never refuses the access log
    address = [clusters[n]["load_assignment"]["endpoints"] for n in (EXT_PROC_CLUSTER, ACCESS_LOG_CLUSTER)]
    assert address[0] == address[1]
    assert clusters[ACCESS_LOG_CLUSTER]["per_connection_buffer_limit_bytes"] == ACCESS_LOG_BUFFER_BYTES
    assert "per_connection_buffer_limit_bytes" not in clusters[EXT_PROC_CLUSTER]
    assert "health_checks" not in clusters[ACCESS_LOG_CLUSTER]  # one health check per replica is the ext_proc's
    # replicas: one that refuses is kept out
    assert ("outlier_detection" in clusters[ACCESS_LOG_CLUSTER]) is (socket_dir is None)


def test_default_control_plane_limit():
    boot = bootstrap(BootstrapOptions())
    (ext_proc,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == EXT_PROC_CLUSTER]
    assert thresholds(ext_proc)[2] == DEFAULT_MAX_STREAMS


@pytest.mark.parametrize(("connections", "monitor"), [(None, False), (9_000, True)])
def test_downstream_connections_are_limited_only_where_the_descriptors_are_known(connections, monitor):
    boot = bootstrap(BootstrapOptions(max_downstream_connections=connections))
    assert ("overload_manager" in boot) is monitor
    if monitor:
        (resource,) = boot["overload_manager"]["resource_monitors"]
        assert resource["name"] == "envoy.resource_monitors.global_downstream_max_connections"
        assert resource["typed_config"]["max_active_downstream_connections"] == connections
