"""The clusters of pools of in-cluster model servers (docs/in-cluster-models.md).

A pool's cluster holds no endpoint list: it is an ORIGINAL_DST cluster that sends each request
to the address ("ip:port") a request header names (`original_dst_lb_config.use_http_header`,
as the Gateway API Inference Extension's endpoint pickers do). The ext_proc sets that header
after picking the endpoint by load; each cluster reads its own header
(`extproc.protocol.endpoint_header`), which no client can set (internal headers are stripped,
and the ext_proc overwrites its own). So endpoints come and go without a CDS update.

Per pool up to three clusters, as for a provider: the plain one (rules without `retries`), the
failover one (the retry rewrite on its upstream filters) and the retry one (the same, for the
attempt after the pool's first: another endpoint, named by its own header).
"""

from __future__ import annotations

from typing import Any

from ..policy.table import Pool
from ..protocol import BUFFER_MARGIN, endpoint_header
from .clusters import UpstreamOptions
from .failover import retry_rewrite_filters

_HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def pool_cluster(name: str, pool: Pool, options: UpstreamOptions, failover: bool = False) -> dict:
    """A pool's cluster: plain HTTP/1.1, h2c, or TLS (certificate name: the pool's host), to the
    endpoint its header names."""
    protocol: dict[str, Any] = {"@type": f"type.googleapis.com/{_HTTP_OPTIONS}"}
    if pool.protocol == "h2c":
        protocol["explicit_http_config"] = {"http2_protocol_options": {}}
    elif pool.protocol == "https":
        protocol["auto_config"] = {"http_protocol_options": {}, "http2_protocol_options": {}}
    else:
        protocol["explicit_http_config"] = {"http_protocol_options": {}}
    cluster: dict[str, Any] = {
        "name": name,
        "type": "ORIGINAL_DST",
        "lb_policy": "CLUSTER_PROVIDED",
        "connect_timeout": "5s",
        "original_dst_lb_config": {"use_http_header": True, "http_header_name": endpoint_header(name)},
        "typed_extension_protocol_options": {_HTTP_OPTIONS: protocol},
        # a model server holds requests for long: Envoy's default of 1024 at a time is no bound here
        "circuit_breakers": {"thresholds": [{"max_requests": 100_000, "max_pending_requests": 100_000,
                                             "max_retries": 100_000}]},
    }
    if pool.protocol == "https":
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": pool.host,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "validation_context": {
                        "trusted_ca": {"filename": options.ca_file},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": pool.host}}],
                    },
                },
            },
        }
    if failover:
        protocol["http_filters"] = retry_rewrite_filters(name, options.body_limit)
        cluster["per_connection_buffer_limit_bytes"] = options.body_limit + BUFFER_MARGIN
    return cluster
