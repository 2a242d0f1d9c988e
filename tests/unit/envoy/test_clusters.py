"""The clusters sent over CDS: a provider's (TLS to its host, whatever address is dialled), its
failover cluster's, and an egress gateway's."""

from __future__ import annotations

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from extproc.envoy.addresses import HostPort
from extproc.envoy.clusters import UpstreamOptions, egress_cluster, egress_clusters, provider_cluster, to_cluster_proto
from support.gateway_docs import EGRESS, EGRESS_ADDR, MESH_VIEW, OTHER, A, compiled, providers
from support.manifests import route, rule


def test_forward_carries_the_gateway_address(tmp_path):
    table = compiled(tmp_path, providers() + [route("r", "chat", [rule(A)], gateways=[EGRESS])], MESH_VIEW).table
    forward = table.forwarded["chat"]
    assert (forward.cluster, forward.address) == ("llm_egress_llm-gateway_egress", EGRESS_ADDR)
    cluster = egress_cluster(forward)
    assert cluster["type"] == "STATIC" and "transport_socket" not in cluster  # plain HTTP to the gateway
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "10.0.0.7", "port_value": 8080}
    assert list(egress_clusters(table)) == ["llm_egress_llm-gateway_egress"]
    by_name = egress_cluster(compiled(tmp_path, providers() + [route("r", "chat", [rule(A)], gateways=[OTHER])],
                                      MESH_VIEW).table.forwarded["chat"])
    assert by_name["type"] == "STRICT_DNS" and by_name["load_assignment"]["endpoints"][0]["lb_endpoints"][0][
        "endpoint"]["address"]["socket_address"] == {"address": "other.llm-gateway.svc.cluster.local", "port_value": 80}


def tls(cluster_msg: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    ctx = tls_pb2.UpstreamTlsContext()
    assert cluster_msg.transport_socket.typed_config.Unpack(ctx)
    return ctx


@pytest.mark.parametrize(("host", "resolve", "address", "port", "cluster_type"), [
    pytest.param("dashscope.aliyuncs.com", {}, "dashscope.aliyuncs.com", 443, cluster_pb2.Cluster.LOGICAL_DNS,
                 id="name-default-port"),
    pytest.param("api.moonshot.cn", {"api.moonshot.cn": HostPort("127.0.0.1", 8443)}, "127.0.0.1", 8443,
                 cluster_pb2.Cluster.STATIC, id="resolve-to-ipv4"),
    pytest.param("api.moonshot.cn", {"api.moonshot.cn": HostPort("::1", 9443)}, "::1", 9443,
                 cluster_pb2.Cluster.STATIC, id="resolve-to-ipv6"),
    pytest.param("api.moonshot.cn", {"api.moonshot.cn": HostPort("fake-provider", 443)}, "fake-provider", 443,
                 cluster_pb2.Cluster.LOGICAL_DNS, id="resolve-to-other-name"),
    pytest.param("api.moonshot.cn", {"dashscope.aliyuncs.com": HostPort("127.0.0.1", 1)}, "api.moonshot.cn", 443,
                 cluster_pb2.Cluster.LOGICAL_DNS, id="resolve-for-other-host-ignored"),
])
def test_provider_cluster(host, resolve, address, port, cluster_type):
    name = "llm_provider_x"
    cluster = provider_cluster(name, host, UpstreamOptions(resolve=resolve, ca_file="/tmp/ca.pem"))
    msg = to_cluster_proto(cluster)
    assert msg.name == name
    assert msg.type == cluster_type
    endpoint = msg.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert (endpoint.address.socket_address.address, endpoint.address.socket_address.port_value) == (address, port)
    assert endpoint.hostname == host
    ctx = tls(msg)
    assert ctx.sni == host  # SNI is the provider host whatever address is dialled
    validation = ctx.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/tmp/ca.pem"
    sans = [(m.san_type, m.matcher.exact) for m in validation.match_typed_subject_alt_names]
    assert sans == [(common_pb2.SubjectAltNameMatcher.DNS, host)]
    assert msg.HasField("typed_dns_resolver_config") is (cluster_type == cluster_pb2.Cluster.LOGICAL_DNS)


@pytest.mark.parametrize("failover", [False, True])
def test_only_a_failover_cluster_carries_the_retry_rewrite(failover):
    """Requests of rules without `retries` go to the plain cluster: no upstream filters (Envoy's
    default codec), Envoy's default buffer limit and retry budget: they pay nothing for failover.
    Both admit the same requests in flight."""
    cluster = provider_cluster("c", "a.example.com", UpstreamOptions(body_limit=4 << 20), failover=failover)
    msg = to_cluster_proto(cluster)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    names = [f["name"] for f in options.get("http_filters", [])]
    if failover:
        assert names == ["llm_gateway.retry_rewrite", "llm_gateway.next_attempt", "envoy.filters.http.upstream_codec"]
        assert msg.per_connection_buffer_limit_bytes.value == (4 << 20) + (1 << 20)
        assert msg.circuit_breakers.thresholds[0].max_retries.value == 100_000
    else:
        assert names == []
        assert not msg.HasField("per_connection_buffer_limit_bytes")
        assert not msg.circuit_breakers.thresholds[0].HasField("max_retries")
    assert msg.circuit_breakers.thresholds[0].max_requests.value == 10_000


def test_provider_cluster_connect_timeout():
    msg = to_cluster_proto(provider_cluster("c", "a.example.com", UpstreamOptions(connect_timeout_s=2.5)))
    assert msg.connect_timeout.ToMilliseconds() == 2500


@pytest.mark.parametrize(("dns_server", "resolver"), [
    pytest.param(None, "envoy.network.dns_resolver.getaddrinfo", id="system-resolver"),
    pytest.param(HostPort("127.0.0.1", 5353), "envoy.network.dns_resolver.cares", id="dns-resolver-flag"),
])
@pytest.mark.parametrize("failover", [False, True])
def test_a_provider_name_never_holds_up_readiness(dns_server, resolver, failover):
    """A cluster found by DNS does not wait for its first answer (Envoy's readiness, a CDS
    update's warming), asks again at its refresh rate when a name does not resolve, and resolves with the
    system resolver or, with --dns-resolver, c-ares asking that server only."""
    msg = to_cluster_proto(provider_cluster("c", "a.example.com", UpstreamOptions(dns_resolver=dns_server),
                                            failover=failover))
    assert msg.type == cluster_pb2.Cluster.LOGICAL_DNS
    assert msg.HasField("wait_for_warm_on_init") and msg.wait_for_warm_on_init.value is False
    assert not msg.HasField("dns_failure_refresh_rate")  # deprecated in Envoy 1.40: the refresh rate applies
    assert msg.typed_dns_resolver_config.name == resolver
    if dns_server is not None:
        from envoy.extensions.network.dns_resolver.cares.v3 import cares_dns_resolver_pb2

        cares = cares_dns_resolver_pb2.CaresDnsResolverConfig()
        assert msg.typed_dns_resolver_config.typed_config.Unpack(cares)
        assert [(r.socket_address.address, r.socket_address.port_value) for r in cares.resolvers] == [
            ("127.0.0.1", 5353)]


def test_a_provider_at_a_fixed_address_has_no_resolver():
    msg = to_cluster_proto(provider_cluster("c", "a.example.com", UpstreamOptions(
        resolve={"a.example.com": HostPort("10.0.0.1", 443)}, dns_resolver=HostPort("127.0.0.1", 53))))
    assert msg.type == cluster_pb2.Cluster.STATIC
    assert not msg.HasField("typed_dns_resolver_config") and not msg.HasField("wait_for_warm_on_init")


def test_an_egress_gateway_name_never_holds_up_a_sidecar(tmp_path):
    table = compiled(tmp_path, providers() + [route("r", "chat", [rule(A)], gateways=[OTHER])], MESH_VIEW).table
    (cluster,) = egress_clusters(table, HostPort("127.0.0.1", 5353)).values()
    msg = to_cluster_proto(cluster)
    assert msg.type == cluster_pb2.Cluster.STRICT_DNS and msg.wait_for_warm_on_init.value is False
    assert msg.typed_dns_resolver_config.name == "envoy.network.dns_resolver.cares"
