"""A pool's clusters: ORIGINAL_DST on the ext_proc's per-cluster endpoint header, in each protocol,
valid Envoy config (parsed as the Cluster protobuf CDS sends)."""

from __future__ import annotations

import pytest

from extproc.envoy.clusters import UpstreamOptions, to_cluster_proto
from extproc.envoy.pools import pool_cluster
from extproc.policy.table import Pool
from extproc.protocol import endpoint_header

HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


@pytest.mark.parametrize(("protocol", "explicit", "tls"), [
    ("http", {"http_protocol_options": {}}, False),
    ("h2c", {"http2_protocol_options": {}}, False),
    ("https", None, True),
])
def test_pool_cluster(protocol, explicit, tls):
    pool = Pool("qwen.team.inferencepool", "InferencePool", "team/qwen", protocol, ("10.0.0.1:8000",))
    cluster = pool_cluster("llm_provider_qwen_team_inferencepool", pool, UpstreamOptions(ca_file="/ca.pem"))
    assert cluster["type"] == "ORIGINAL_DST" and cluster["lb_policy"] == "CLUSTER_PROVIDED"
    assert cluster["original_dst_lb_config"] == {
        "use_http_header": True, "http_header_name": endpoint_header("llm_provider_qwen_team_inferencepool")}
    assert "load_assignment" not in cluster  # endpoints come and go without CDS
    options = cluster["typed_extension_protocol_options"][HTTP_OPTIONS]
    assert options.get("explicit_http_config") == explicit
    assert ("transport_socket" in cluster) == tls
    if tls:
        context = cluster["transport_socket"]["typed_config"]
        assert context["sni"] == pool.host
        assert context["common_tls_context"]["validation_context"]["trusted_ca"] == {"filename": "/ca.pem"}
    proto = to_cluster_proto(cluster)
    assert proto.original_dst_lb_config.use_http_header
    assert "http_filters" not in options


def test_a_pools_failover_cluster_rewrites_retried_attempts():
    pool = Pool("qwen.team.inferencepool", "InferencePool", "team/qwen", "http", ())
    cluster = pool_cluster("llm_retry_qwen_team_inferencepool", pool, UpstreamOptions(), failover=True)
    filters = cluster["typed_extension_protocol_options"][HTTP_OPTIONS]["http_filters"]
    assert [f["name"] for f in filters] == ["llm_gateway.retry_rewrite", "llm_gateway.next_attempt",
                                            "envoy.filters.http.upstream_codec"]
    assert to_cluster_proto(cluster).name == "llm_retry_qwen_team_inferencepool"
