"""The Envoy bootstrap: the listener with the gateway's filters (ext_proc, the usage readers,
the router with failover's upstream logs), the access logs, the local replies, the static
clusters of the control plane, and xDS for everything that changes with the config (provider
clusters, routes). It holds no API key and no provider."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..policy.capacity import DEFAULT_MAX_STREAMS, ConnectionLimits
from ..protocol import (
    ACCESS_LOG_CLUSTER,
    BUFFER_MARGIN,
    CERTIFICATES_CLUSTER,
    CONTROL_CLUSTER,
    DEFAULT_BODY_LIMIT,
    EXT_PROC_CLUSTER,
    EXT_PROC_SOCKET,
    METADATA_NAMESPACE,
    PEER_SUBJECT_ATTRIBUTE,
    PEER_URI_ATTRIBUTE,
    XDS_SOCKET,
)
from .access_logs import access_logs, grpc_access_log
from .addresses import HostPort, is_ip, socket_address
from .answer_filter import answer_filter
from .answer_reader import answer_reader
from .body_transform import headers_only_filters
from .circuit_breakers import circuit_breakers
from .failover import upstream_logs
from .local_replies import local_reply_config
from .routes import ANY_HOST_ROUTE_CONFIG_NAME, PASSTHROUGH_CLUSTER, ROUTE_CONFIG_NAME
from .secrets import downstream_mtls
from .usage_readers import usage_from_event_stream, usage_from_json

HCM_NAME = "envoy.filters.network.http_connection_manager"
HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"

DEFAULT_BODY_TIMEOUT_S = 30


DEFAULT_IDLE_TIMEOUT_S = 300.0  # Envoy's own stream idle default: 5 minutes without a byte


def _grpc_service(opts: BootstrapOptions) -> dict:
    return {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER,
                           "max_receive_message_length": opts.body_limit + BUFFER_MARGIN}}


@dataclass(frozen=True)
class GatewayListenerTls:
    """An egress gateway's listener taking mutual TLS from the sidecars: it presents `identity`
    (its SPIFFE ID) and requires a client certificate of the mesh, both from the control plane of
    the sidecars at `control` (SDS), to which it presents the token named by the SDS file
    `token_sds` (see `token_sds`)."""

    identity: str
    control: HostPort
    token_sds: str


@dataclass(frozen=True)
class BootstrapOptions:
    listen: HostPort = HostPort("127.0.0.1", 10000)
    admin: HostPort = HostPort("127.0.0.1", 9901)
    control: HostPort = HostPort("127.0.0.1", 18000)
    ext_proc: HostPort | None = None  # None: the control host, on the next port
    body_limit: int = DEFAULT_BODY_LIMIT
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S  # how long a client may take to send its body
    route_timeout_s: int = 0  # no total bound: the ext_proc sets one per request where the config has one
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S  # silence allowed between bytes of an answer
    node_id: str = "llm-gateway"
    access_log: str | None = "/dev/stdout"  # a JSON line per request; None for no file log
    # A sidecar behind iptables interception: LLM host names (over RDS) go through the gateway,
    # all other port-80 traffic goes on to its original destination untouched.
    sidecar: bool = False
    # Local mode: the control plane's Unix sockets in this directory instead of `control`/`ext_proc`.
    socket_dir: str | None = None
    # TCP: the SDS file (see `token_sds`) naming the bearer token Envoy presents on every stream
    # to the control plane; Envoy re-reads the token when it changes on disk.
    token_sds: str | None = None
    readiness: HostPort = HostPort("0.0.0.0", 15021)  # sidecar only: GET /ready for the kubelet
    # streams open at once to the control plane (ext_proc, access log, xDS): the circuit breakers of
    # its clusters; past it a request gets 503 `overloaded` (see extproc.policy.capacity)
    max_ext_proc_streams: int = DEFAULT_MAX_STREAMS
    # client connections Envoy accepts at once (its global_downstream_max_connections), so it never
    # runs out of file descriptors; None: no limit (`up` sets it from its descriptor limit)
    max_downstream_connections: int | None = None
    # An egress gateway's listener with mutual TLS: the caller of each request is the workload its
    # client certificate names, which Envoy tells the ext_proc (`request_attributes`)
    gateway_tls: GatewayListenerTls | None = None
    # issue 32's experiment, off by default (docs/decisions/0008-headers-only-path.md): the ext_proc
    # gets no request body, Envoy's transform filters read and write it (extproc.envoy.body_transform)
    headers_only: bool = False


_XDS_SOURCE = {
    "resource_api_version": "V3",
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": CONTROL_CLUSTER}}],
        "set_node_on_first_message_only": True,
    },
}


def bootstrap(opts: BootstrapOptions) -> dict:
    """The Envoy bootstrap. It holds no API key and no provider: those come over ext_proc and xDS."""
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": _grpc_service(opts),
        "failure_mode_allow": False,
        # The body is streamed to the ext_proc right behind the headers, and the headers' answer
        # comes once the body is whole: one round trip per request. So this also bounds how long
        # a client may take to send its body.
        "message_timeout": f"{opts.body_timeout_s:g}s",
        "send_body_without_waiting_for_header_response": True,
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "STREAMED",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
        "metadata_options": {"receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        "stat_prefix": "request",
    }
    hcm: dict[str, Any] = {
        "@type": HCM_TYPE,
        "stat_prefix": "llm_gateway",
        "codec_type": "AUTO",
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            # Only for requests the ext_proc marked: their answer, turned into the client's format
            # (after the usage readers on the way back, which read the provider's own answer)
            answer_filter(opts.body_limit),
            # The rewritten body, whole, with its content-length (a streamed body would go to the
            # provider chunked): some providers want the length.
            {"name": "envoy.filters.http.buffer",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                              "max_request_bytes": opts.body_limit + BUFFER_MARGIN}},
            {"name": "envoy.filters.http.json_to_metadata", "typed_config": usage_from_json()},
            {"name": "llm_gateway.event_stream", "typed_config": usage_from_event_stream()},
            # Off unless traces are exported (the routes turn it on): a sampled answer's finish
            # reason (and, capturing contents, its first bytes), read as it passes
            answer_reader(),
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                              "suppress_envoy_headers": True,
                              "upstream_log": upstream_logs(grpc_access_log(), opts.access_log)}},
        ],
        "local_reply_config": local_reply_config(opts.body_timeout_s, opts.body_limit),
        # silence allowed while waiting for an answer or between its bytes (streamed events);
        # there is no total bound unless a provider's spec.timeout sets one
        "stream_idle_timeout": f"{opts.idle_timeout_s:g}s",
        "access_log": access_logs(opts.access_log),
    }
    if opts.headers_only:
        hcm["http_filters"] = headers_only_filters(hcm["http_filters"])
    chain: dict[str, Any] = {"filters": [{"name": HCM_NAME, "typed_config": hcm}]}
    listener = {
        "name": "llm_gateway_http",
        "address": socket_address(opts.listen),
        # above the body limit, which the ext_proc enforces (413): Envoy's flow control must not
        # stop reading a body the ext_proc is still waiting for
        "per_connection_buffer_limit_bytes": opts.body_limit + BUFFER_MARGIN,
        "filter_chains": [chain],
    }
    # the ext_proc and the access log reach the same server, through clusters of their own
    limits = ConnectionLimits.streams(opts.max_ext_proc_streams)
    if opts.socket_dir is not None:
        ext_proc_socket = f"{opts.socket_dir}/{EXT_PROC_SOCKET}"
        clusters = [_grpc_cluster(CONTROL_CLUSTER, f"{opts.socket_dir}/{XDS_SOCKET}", limits),
                    _grpc_cluster(EXT_PROC_CLUSTER, ext_proc_socket, limits),
                    access_log_cluster(_grpc_cluster(ACCESS_LOG_CLUSTER, ext_proc_socket, limits))]
    else:  # replicas behind a Service: health-checked, a dead one ejected (see `replica_failover`)
        clusters = [_grpc_cluster(CONTROL_CLUSTER, opts.control, limits, opts.token_sds),
                    replica_failover(_grpc_cluster(EXT_PROC_CLUSTER, ext_proc_address(opts), limits, opts.token_sds)),
                    access_log_cluster(replica_failover(_grpc_cluster(ACCESS_LOG_CLUSTER, ext_proc_address(opts),
                                                                      limits, opts.token_sds)))]
    if opts.gateway_tls is not None:
        tls = opts.gateway_tls
        chain["transport_socket"] = downstream_mtls(tls.identity, CERTIFICATES_CLUSTER)
        ext_proc["request_attributes"] = [PEER_URI_ATTRIBUTE, PEER_SUBJECT_ATTRIBUTE]
        clusters.append(_grpc_cluster(CERTIFICATES_CLUSTER, tls.control, limits, tls.token_sds))
    if opts.sidecar:
        hcm["rds"] = {"route_config_name": ROUTE_CONFIG_NAME, "config_source": _XDS_SOURCE}
        hcm["strip_any_host_port"] = True
        hcm["generate_request_id"] = False  # passthrough traffic leaves as it came
        listener["listener_filters"] = [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]
        clusters.append({"name": PASSTHROUGH_CLUSTER, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                         "connect_timeout": "10s"})
    else:
        # One route for every host (over RDS: it names the provider clusters, see
        # any_host_route_configuration); the ext_proc answers hosts it does not serve with a 404.
        hcm["rds"] = {"route_config_name": ANY_HOST_ROUTE_CONFIG_NAME, "config_source": _XDS_SOURCE}
    boot = {
        "node": {"id": opts.node_id, "cluster": "llm-gateway"},
        "admin": {"address": socket_address(opts.admin)},
        "static_resources": {"listeners": [listener, *([readiness_listener(opts.readiness)] if opts.sidecar else [])],
                             "clusters": clusters},
        "dynamic_resources": {"cds_config": _XDS_SOURCE},
    }
    if opts.max_downstream_connections is not None:
        boot["overload_manager"] = downstream_connection_limit(opts.max_downstream_connections)
    return boot


def downstream_connection_limit(connections: int) -> dict:
    """Envoy's overload manager refusing client connections past `connections` (it closes a new
    one at once, counted in `overload.global_downstream_max_connections`) rather than running out
    of file descriptors, when accepts and connects to providers fail half-way (see
    extproc.ops.descriptors)."""
    return {"resource_monitors": [{
        "name": "envoy.resource_monitors.global_downstream_max_connections",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3."
                     "DownstreamConnectionsConfig",
            "max_active_downstream_connections": connections}}]}


def ext_proc_address(opts: BootstrapOptions) -> HostPort:
    return opts.ext_proc or HostPort(opts.control.host, opts.control.port + 1)


TOKEN_SECRET = "llm_gateway_control_token"


def token_sds(token_file: str) -> dict:
    """The SDS file behind the control-plane token: a generic secret read from `token_file`. Envoy
    watches the token's directory and re-reads it when it changes (as the kubelet rewrites a
    projected ServiceAccount token), which a secret inside the bootstrap would not. The config
    dump shows only the secret's name, never the token."""
    directory = token_file.rsplit("/", 1)[0] or "/"
    return {"resources": [{
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
        "name": TOKEN_SECRET,
        "generic_secret": {"secret": {"filename": token_file, "watched_directory": {"path": directory}}},
    }]}


def _token_filters(token_sds_file: str) -> list[dict]:
    """`authorization: Bearer <token>` on every gRPC stream to the control plane (xDS, ext_proc,
    access log): an upstream filter of the control-plane clusters, so Envoy's own gRPC clients
    carry it too."""
    return [{
        "name": "envoy.filters.http.credential_injector",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.credential_injector.v3.CredentialInjector",
            "overwrite": True,
            "credential": {"name": "envoy.http.injected_credentials.generic", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.injected_credentials.generic.v3.Generic",
                "credential": {"name": TOKEN_SECRET, "sds_config": {
                    "path_config_source": {"path": token_sds_file}, "resource_api_version": "V3"}},
                "header": "authorization",
                "header_value_prefix": "Bearer ",
            }},
        },
    }, {
        "name": "envoy.filters.http.upstream_codec",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"},
    }]


def _grpc_cluster(name: str, address: HostPort | str, limits: ConnectionLimits,
                  token_sds_file: str | None = None) -> dict:
    """A control-plane cluster: a Unix socket path (local mode) or HOST:PORT (TCP, with the token),
    carrying at most `limits` streams at once (Envoy's default of 1,024 failed every request past
    the 1,024th being decided at once with a 500)."""
    options: dict[str, Any] = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    if token_sds_file is not None:
        options["http_filters"] = _token_filters(token_sds_file)
    if isinstance(address, str):
        kind, endpoint = "STATIC", {"pipe": {"path": address}}
    else:
        kind, endpoint = "STATIC" if is_ip(address.host) else "STRICT_DNS", socket_address(address)
    return {
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "circuit_breakers": circuit_breakers(limits),
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": endpoint}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options},
    }


MAX_STREAMS_PER_CONNECTION = 1000
# What Envoy queues on an access-log stream before it counts the stream backed up and, once its
# batch (16 KiB) is full too, drops entries: thousands of requests ending at once write a few MiB
# of entries in a moment; with the default 1 MiB, 4,260 of 6,000 were lost (none with this).
ACCESS_LOG_BUFFER_BYTES = 32 << 20


def access_log_cluster(cluster: dict) -> dict:
    """The access log's cluster: room to queue a burst of entries (ACCESS_LOG_BUFFER_BYTES), so
    that requests ending together are all counted; Envoy holds that memory only while the
    receiver catches up. No active health check of its own (the ext_proc's already asks every
    replica each second, and a second one would double that load on the control plane): its
    few streams are long-lived, a broken one is opened again, and outlier detection (over TCP)
    keeps a replica that refuses out."""
    cluster = {**cluster, "per_connection_buffer_limit_bytes": ACCESS_LOG_BUFFER_BYTES}
    cluster.pop("health_checks", None)
    return cluster


def replica_failover(cluster: dict) -> dict:
    """Envoy's ext_proc cluster made to fail no new request when a replica goes away: an active
    gRPC health check (a draining replica says NOT_SERVING and gets no new stream), and outlier
    detection that ejects a replica at its first refused connection (one killed outright). With
    a single replica (`up`) an unhealthy host is still used (panic mode). A connection carries
    at most MAX_STREAMS_PER_CONNECTION streams, so Envoy's few long-lived connections are renewed
    now and then: each new one lands on a worker process of the kernel's choice (SO_REUSEPORT),
    and on a new replica after a scale-up."""
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["common_http_protocol_options"] = {"max_requests_per_connection": MAX_STREAMS_PER_CONNECTION}
    return {**cluster,
        "health_checks": [{
            "timeout": "1s", "interval": "1s", "no_traffic_interval": "1s",
            "unhealthy_threshold": 1, "healthy_threshold": 1,
            "grpc_health_check": {},
        }],
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 1,
            "enforcing_consecutive_local_origin_failure": 100,
            "interval": "1s", "base_ejection_time": "5s", "max_ejection_percent": 100,
        },
    }


def readiness_listener(address: HostPort) -> dict:
    """A listener for the sidecar's readiness probe (GET /ready: 200, or 503 once Envoy is
    draining), so the kubelet never needs Envoy's admin interface, which must stay on loopback."""
    hcm = {
        "@type": HCM_TYPE,
        "stat_prefix": "llm_gateway_readiness",
        "http_filters": [
            {"name": "envoy.filters.http.health_check",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck",
                              "pass_through_mode": False,
                              "headers": [{"name": ":path", "string_match": {"exact": "/ready"}}]}},
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
        ],
        "route_config": {"virtual_hosts": [{"name": "readiness", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "direct_response": {"status": 404}}]}]},
    }
    return {"name": "llm_gateway_readiness", "address": socket_address(address),
            "filter_chains": [{"filters": [{"name": HCM_NAME, "typed_config": hcm}]}]}
