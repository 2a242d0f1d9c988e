"""The clusters sent over xDS: one TLS cluster per provider (and a second one, with the retry
rewrite, for providers of rules with `retries`), and the sidecars' clusters for egress gateways.
Written as plain dicts in Envoy's JSON form, the form Envoy's documentation uses, and turned
into protobuf for CDS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Imported for their side effect: registering the types that `@type` names below.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.network.dns_resolver.cares.v3 import cares_dns_resolver_pb2  # noqa: F401
from envoy.extensions.network.dns_resolver.getaddrinfo.v3 import getaddrinfo_dns_resolver_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401
from google.protobuf import json_format

from ..policy.capacity import DEFAULT_PROVIDER_LIMITS, ConnectionLimits
from ..policy.table import Forward, RoutingTable
from ..protocol import BUFFER_MARGIN, DEFAULT_BODY_LIMIT
from .addresses import HostPort, dns_resolver, is_ip, socket_address
from .circuit_breakers import circuit_breakers
from .failover import retry_rewrite_filters

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


PROVIDER_PORT = 443


@dataclass(frozen=True)
class UpstreamOptions:
    """How provider clusters connect: trust store and host-to-address overrides (curl's --resolve)."""

    ca_file: str = SYSTEM_CA_BUNDLE
    resolve: dict[str, HostPort] = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    body_limit: int = DEFAULT_BODY_LIMIT  # a retried attempt's body reaches the retry rewrite whole
    dns_resolver: HostPort | None = None  # one DNS server for provider names; None: the system resolver


def provider_cluster(name: str, host: str, options: UpstreamOptions, failover: bool = False,
                     limits: ConnectionLimits = DEFAULT_PROVIDER_LIMITS) -> dict:
    """A TLS cluster to a provider: SNI and certificate name are the provider host, whatever
    address it is reached at; the name resolves through the system resolver like any program's.
    `failover`: the provider's cluster for rules with `retries` (`extproc.protocol.failover_cluster`),
    with the upstream filters that rewrite a retried attempt; the plain one has none, so requests
    of other rules pay nothing for failover. `limits`: the requests in flight it admits (its
    LLMProvider's `spec.connectionPool`), past which Envoy answers 503 `overloaded`."""
    target = options.resolve.get(host, HostPort(host, PROVIDER_PORT))
    cluster: dict[str, Any] = {
        "name": name,
        "connect_timeout": f"{options.connect_timeout_s}s",
        "type": "STATIC" if is_ip(target.host) else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": socket_address(target), "hostname": host}}]}],
        },
        "transport_socket": {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": host,
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "validation_context": {
                        "trusted_ca": {"filename": options.ca_file},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
                    },
                },
            },
        },
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "auto_config": {"http_protocol_options": {}, "http2_protocol_options": {}},
            },
        },
    }
    if failover:
        # a retried attempt rewritten for this provider (docs/failover.md)
        cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"][
            "http_filters"] = retry_rewrite_filters(name, options.body_limit)
        # a retried attempt's body passes the retry rewrite whole (buffered): above the body limit
        # (at Envoy's 1 MiB default, a larger retried body crashed Envoy 1.40)
        cluster["per_connection_buffer_limit_bytes"] = options.body_limit + BUFFER_MARGIN
    # the requests in flight it admits; on a failover cluster retries in flight too: they are
    # failovers to another provider, not a retry storm on one, and Envoy's default of 3 at a time
    # would pass failures on to clients under load
    cluster["circuit_breakers"] = circuit_breakers(limits, max_retries=100_000 if failover else None)
    if cluster["type"] == "LOGICAL_DNS":
        cluster.update(resolving(options.dns_resolver))
    return cluster


def resolving(server: HostPort | None) -> dict:
    """The fields of a cluster found by DNS. `wait_for_warm_on_init: false`: Envoy's readiness
    (and a CDS update's warming) does not wait for the name's first answer, so a name that
    resolves slowly or never holds up no other route; until it resolves, the cluster has no
    host and its requests get a 503 `provider_address_unknown` (`extproc.envoy.local_replies`).
    A name that does not resolve is asked again at the cluster's refresh rate (Envoy's default,
    5 s; the cluster's `dns_failure_refresh_rate`, which could ask sooner, is deprecated in 1.40)."""
    return {"typed_dns_resolver_config": dns_resolver(server), "wait_for_warm_on_init": False}


def to_cluster_proto(cluster: dict) -> cluster_pb2.Cluster:
    return json_format.ParseDict(cluster, cluster_pb2.Cluster())


def egress_cluster(forward: Forward, dns_server: HostPort | None = None) -> dict:
    """The sidecars' cluster for an egress gateway's Service: plain HTTP (the gateway originates
    TLS to the provider), found by DNS like any Service, or at a fixed address."""
    address = HostPort.parse(forward.address)
    kind = "STATIC" if is_ip(address.host) else "STRICT_DNS"
    cluster: dict = {
        "name": forward.cluster,
        "type": kind,
        "connect_timeout": "5s",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {"cluster_name": forward.cluster, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket_address(address)}}]}]},
    }
    if kind == "STRICT_DNS":  # the same resolver as providers'
        cluster.update(resolving(dns_server))
    return cluster


def egress_clusters(table: RoutingTable, dns_server: HostPort | None = None) -> dict[str, dict]:
    """The clusters of the egress gateways this table forwards to, by name (CDS)."""
    return {forward.cluster: egress_cluster(forward, dns_server) for forward in table.forwarded.values()}
