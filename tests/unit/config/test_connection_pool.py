"""LLMProvider.spec.connectionPool (our extension, Istio DestinationRule names): the requests in
flight the gateway keeps to a provider; checked with the field named, compiled into the routing
table, and sent to Envoy as the provider's clusters' circuit breakers."""

from __future__ import annotations

import pytest

from extproc.config.crds import crd_documents
from extproc.config.problems import ConfigError
from extproc.envoy.clusters import UpstreamOptions
from extproc.ops.control_plane import ControlPlane
from extproc.ops.data_plane import DataPlane
from extproc.policy.capacity import DEFAULT_PROVIDER_LIMITS, ConnectionLimits
from extproc.policy.table import EMPTY_TABLE, TableHolder
from support.manifests import load_docs, provider, route, rule

HOST = "a.example.com"


@pytest.mark.parametrize(("pool", "limits"), [
    pytest.param(None, None, id="unset-defaults"),
    pytest.param({"http": {"http2MaxRequests": 50}}, ConnectionLimits(10_000, 10_000, 50), id="requests"),
    pytest.param({"tcp": {"maxConnections": 5}, "http": {"http1MaxPendingRequests": 7, "http2MaxRequests": 9}},
                 ConnectionLimits(5, 7, 9), id="all-three"),
    pytest.param({}, None, id="empty-is-the-defaults"),
])
def test_connection_pool_compiles_into_the_tables_limits(tmp_path, pool, limits):
    extra = {} if pool is None else {"connectionPool": pool}
    table = load_docs(tmp_path, provider("p", HOST, **extra)).table
    assert table.capacity.get(HOST) == limits  # only where it changes the defaults


@pytest.mark.parametrize(("pool", "message", "field"), [
    pytest.param({"http": {"http2MaxRequests": 0}}, "greater than or equal to 1",
                 "spec.connectionPool.http.http2MaxRequests", id="zero"),
    pytest.param({"tcp": {"maxConnections": 1 << 32}}, "less than or equal to 4294967295",
                 "spec.connectionPool.tcp.maxConnections", id="past-32-bits"),
    pytest.param({"http": {"maxRetries": 3}}, "unknown field", "spec.connectionPool.http.maxRetries",
                 id="istio-field-not-ours"),
])
def test_bad_connection_pool_names_the_field(tmp_path, pool, message, field):
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, provider("p", HOST, connectionPool=pool))
    (problem,) = info.value.problems
    assert (problem.field, problem.obj) == (field, "LLMProvider default/p")
    assert message in problem.message, problem.message


def test_the_providers_clusters_carry_its_limits_the_others_the_defaults(tmp_path):
    docs = [provider("p", HOST, connectionPool={"http": {"http2MaxRequests": 50}}), provider("q", "b.example.com"),
            route("r", "chat.example.com", [{**rule(HOST, "b.example.com"), "retries": {"attempts": 1}}])]
    table = load_docs(tmp_path, *docs).table
    clusters = ControlPlane(UpstreamOptions(), DataPlane(TableHolder(EMPTY_TABLE)))._clusters(table)
    by_host = {name: cluster["circuit_breakers"]["thresholds"][0] for name, cluster in clusters.items()}
    for name in ("llm_provider_a_example_com", "llm_failover_a_example_com"):  # plain and failover twin alike
        assert by_host[name]["max_requests"] == 50
    for name in ("llm_provider_b_example_com", "llm_failover_b_example_com"):
        assert by_host[name]["max_requests"] == DEFAULT_PROVIDER_LIMITS.max_requests


def test_the_crd_carries_the_field():
    (crd,) = [d for d in crd_documents() if d["spec"]["names"]["kind"] == "LLMProvider"]
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    pool = spec["connectionPool"]["properties"]
    assert pool["http"]["properties"]["http2MaxRequests"]["minimum"] == 1
    assert set(pool["tcp"]["properties"]) == {"maxConnections"}
