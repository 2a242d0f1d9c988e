"""Envoy's configuration: the bootstrap (listener, ext_proc filter, control cluster) and the
provider clusters sent over xDS. Both are written as plain dicts in Envoy's JSON form, the
form Envoy's documentation uses, and turned into protobuf where xDS needs it."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from google.protobuf import json_format

# Imported for their side effect: registering the types that `@type` names below.
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.network.dns_resolver.getaddrinfo.v3 import getaddrinfo_dns_resolver_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from envoy.extensions.upstreams.http.v3 import http_protocol_options_pb2  # noqa: F401

from .errors import error_type
from .failover_envoy import add_raw_fields, failover_route, retry_rewrite_filters, upstream_logs, with_raw_fields
from .names import CLUSTER_HEADER, CONTROL_CLUSTER, EXT_PROC_CLUSTER, METADATA_NAMESPACE

SYSTEM_CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
DEFAULT_BODY_LIMIT = 8 * 1024 * 1024
PROVIDER_PORT = 443
DEFAULT_BODY_TIMEOUT_S = 30
DEFAULT_IDLE_TIMEOUT_S = 300.0  # Envoy's own stream idle default: 5 minutes without a byte
BUFFER_MARGIN = 1 << 20


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_host: str = "127.0.0.1") -> "HostPort":
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]") or default_host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class UpstreamOptions:
    """How provider clusters connect: trust store and host-to-address overrides (curl's --resolve)."""

    ca_file: str = SYSTEM_CA_BUNDLE
    resolve: dict[str, HostPort] = field(default_factory=dict)
    connect_timeout_s: float = 10.0
    body_limit: int = DEFAULT_BODY_LIMIT  # a retried attempt's body reaches the retry rewrite whole


def _address(hp: HostPort) -> dict:
    return {"socket_address": {"address": hp.host, "port_value": hp.port}}


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


_GETADDRINFO = {
    "name": "envoy.network.dns_resolver.getaddrinfo",
    "typed_config": {"@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig"},
}


def provider_cluster(name: str, host: str, options: UpstreamOptions, failover: bool = False) -> dict:
    """A TLS cluster to a provider: SNI and certificate name are the provider host, whatever
    address it is reached at; the name resolves through the system resolver like any program's.
    `failover`: the provider's cluster for rules with `retries` (`extproc.names.failover_cluster`),
    with the upstream filters that rewrite a retried attempt; the plain one has none, so requests
    of other rules pay nothing for failover."""
    target = options.resolve.get(host, HostPort(host, PROVIDER_PORT))
    cluster = {
        "name": name,
        "connect_timeout": f"{options.connect_timeout_s}s",
        "type": "STATIC" if _is_ip(target.host) else "LOGICAL_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _address(target), "hostname": host}}]}],
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
        # retries in flight are failovers to another provider, not a retry storm on one: Envoy's
        # default of 3 at a time would pass failures on to clients under load
        cluster["circuit_breakers"] = {"thresholds": [{"max_retries": 100_000}]}
    if cluster["type"] == "LOGICAL_DNS":
        cluster["typed_dns_resolver_config"] = _GETADDRINFO
    return cluster


def to_cluster_proto(cluster: dict) -> cluster_pb2.Cluster:
    return json_format.ParseDict(cluster, cluster_pb2.Cluster())


# Envoy's own answers, by status: (error code, message). Envoy's reason is added to the message.
LOCAL_REPLIES = {
    400: ("bad_request", "the request is not valid HTTP"),
    404: ("not_found", "no route for this request"),
    413: ("request_too_large", "the request body is larger than the gateway accepts"),
    431: ("headers_too_large", "the request headers are larger than the gateway accepts"),
    500: ("gateway_error", "the gateway could not process the request"),
    502: ("bad_upstream_response", "the provider's answer could not be read"),
    503: ("upstream_unavailable", "the provider could not be reached over verified TLS"),
    504: ("upstream_timeout", "the provider did not answer in time"),
}


def _local_reply_config(body_timeout_s: float) -> dict:
    """Envoy's own error answers (no upstream, TLS failure, body too large, ext_proc down) in the
    same OpenAI-style JSON as the ext_proc's. The ext_proc's own answers pass through as they are."""
    def json_body(status: int, code: str, message: str) -> dict:
        text = f"{message} (%RESPONSE_CODE_DETAILS%)"
        return {"json_format": {"error": {"message": text, "type": error_type(status), "code": code}},
                "content_type": "application/json"}

    def status_is(code: int) -> dict:
        return {"status_code_filter": {"comparison": {"op": "EQ", "value": {"default_value": code, "runtime_key": f"llm_gateway.local_reply.{code}"}}}}

    def details_start(prefix: str) -> dict:
        return {"extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                             "expression": f"response.code_details.startsWith('{prefix}')"}}}

    mappers = [{
        # Answers the ext_proc made itself: their body is already the JSON error.
        "filter": details_start("llm_gateway_"),
        "body_format_override": {"text_format_source": {"inline_string": "%LOCAL_REPLY_BODY%"},
                                 "content_type": "application/json"},
    }, {
        # The ext_proc answers a request's headers once its body is whole: a timeout there is a
        # body that did not arrive in time (Envoy would say 504, as if the provider were slow).
        "filter": details_start("ext_proc_error_per-message_timeout"),
        "status_code": 408,
        "body_format_override": json_body(
            408, "request_timeout", f"the request body did not arrive within {body_timeout_s:g} s of its headers"),
    }]
    for status, (code, message) in LOCAL_REPLIES.items():
        mappers.append({"filter": status_is(status), "body_format_override": json_body(status, code, message)})
    return {"mappers": mappers, "body_format": json_body(500, "gateway_error", "the gateway could not answer")}


def _grpc_service(opts: "BootstrapOptions") -> dict:
    return {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER, "max_receive_message_length": opts.body_limit + (1 << 20)}}


def _usage_from_json() -> dict:
    """Envoy reads model and usage of a JSON answer itself (no extra ext_proc message)."""
    def rule(path: list[str], key: str, kind: str) -> dict:
        return {"selectors": [{"key": p} for p in path],
                "on_present": {"metadata_namespace": METADATA_NAMESPACE, "key": key, "type": kind}}

    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "response_rules": {
            "rules": [rule(["model"], "response_model", "STRING"),
                      rule(["usage", "prompt_tokens"], "prompt_tokens", "NUMBER"),
                      rule(["usage", "completion_tokens"], "completion_tokens", "NUMBER"),
                      rule(["usage", "total_tokens"], "total_tokens", "NUMBER")],
            "allow_content_types_regex": {"regex": "application/json.*"},
        },
    }


def _usage_from_event_stream() -> dict:
    """Envoy reads model, usage and error events of a server-sent-event answer itself, in C++, as
    the events pass: no round trip per event. Only `text/event-stream` answers are read (the
    filter's own check). The type is newer than xds-protos, so it is written here by its `@type`
    and checked by Envoy when it loads the bootstrap."""
    def rule(path: list[str], key: str, kind: str, once: bool = False) -> dict:
        config = {"rule": {"selectors": [{"key": p} for p in path],
                           "on_present": {"metadata_namespace": METADATA_NAMESPACE, "key": key, "type": kind}}}
        if once:  # every event names the model: writing it once spares a metadata write per event
            config["stop_processing_after_matches"] = 1
        return config

    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
        "response_rules": {
            "content_parser": {
                "name": "envoy.content_parsers.json",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                    # each event that has a field overwrites the last: the usage event is the last
                    "rules": [rule(["model"], "response_model", "STRING", once=True),
                              rule(["usage", "prompt_tokens"], "prompt_tokens", "NUMBER"),
                              rule(["usage", "completion_tokens"], "completion_tokens", "NUMBER"),
                              rule(["usage", "total_tokens"], "total_tokens", "NUMBER"),
                              # an error event mid-stream: its code, else its type (read after)
                              rule(["error", "code"], "stream_error", "STRING"),
                              rule(["error", "type"], "stream_error", "STRING")],
                },
            },
            "max_event_size": 1 << 20,
        },
    }


# Envoy's time points of a streamed answer, for time to first token and per output token: the
# request's first byte, the provider's first body byte (its first event), its last byte.
STREAM_TIMINGS = {
    "ttft_us": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:us)%",
    "generation_us": "%COMMON_DURATION(US_RX_BODY_BEG:US_RX_END:us)%",
}


def _meta(key: str) -> str:
    return f"%DYNAMIC_METADATA({METADATA_NAMESPACE}:{key})%"


# One JSON line per request. The `llm_gateway` dynamic metadata comes from the ext_proc (route,
# rule, provider, request model, stream), from json_to_metadata (JSON answers) or sse_to_metadata
# (streamed answers): response model, tokens, an error event's type.
ACCESS_LOG_FORMAT = {
    "start_time": "%START_TIME%",
    "request_id": "%REQ(x-request-id)%",  # joins a request's line to its failed attempts' lines
    "method": "%REQ(:METHOD)%",
    "host": _meta("host"),
    "operation": _meta("operation"),
    "route": _meta("route"),
    "rule": _meta("rule"),
    "provider": _meta("provider"),
    "request_model": _meta("request_model"),
    "response_model": _meta("response_model"),
    "stream": _meta("stream"),
    "prompt_tokens": _meta("prompt_tokens"),
    "completion_tokens": _meta("completion_tokens"),
    "total_tokens": _meta("total_tokens"),
    "ttft_ms": _meta("ttft_ms"),  # nothing writes it: null on a JSON answer's line (see below)
    "generation_ms": _meta("generation_ms"),  # the same
    "stream_error": _meta("stream_error"),
    "budget": _meta("budget"),
    "budget_rule": _meta("budget_rule"),
    "budget_key": _meta("budget_key"),
    "budget_remaining_tokens": _meta("ratelimit_remaining_tokens"),
    "attempts": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
    "tried": _meta("tried"),
    "status": "%RESPONSE_CODE%",
    "details": "%RESPONSE_CODE_DETAILS%",
    "flags": "%RESPONSE_FLAGS%",
    "duration_ms": "%DURATION%",
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "bytes_received": "%BYTES_RECEIVED%",
    "bytes_sent": "%BYTES_SENT%",
}


def _streamed(streamed: bool) -> dict:
    """Whether the request asked for a streamed answer (the ext_proc's `stream` decision): a
    metadata filter, a lookup per line where a CEL expression on the answer's headers cost a few
    microseconds per request (measured with scripts/bench). Envoy's metadata filter ignores the
    matcher's `invert`: the two filters test for true and for false; no decision at all (a
    request the ext_proc refused) counts as not streamed."""
    return {"metadata_filter": {
        "matcher": {"filter": METADATA_NAMESPACE, "path": [{"key": "stream"}], "value": {"bool_match": streamed}},
        "match_if_key_not_found": not streamed}}


# A streamed request's line: time to first token from Envoy's time points (whole milliseconds),
# and the time from the first to the last byte of the answer (time per output token is that over
# the output tokens after the first; the metrics compute it).
STREAM_ACCESS_LOG_FORMAT = {
    **ACCESS_LOG_FORMAT,
    "ttft_ms": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%",
    "generation_ms": "%COMMON_DURATION(US_RX_BODY_BEG:US_RX_END:ms)%",
}


def _file_log(path: str, fmt: dict, streamed: bool) -> dict:
    return {"name": "envoy.access_loggers.file", "filter": _streamed(streamed),
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": path, "log_format": {"json_format": fmt}}}


def _access_logs(opts: "BootstrapOptions") -> list[dict]:
    logs = [_grpc_access_log()]
    if opts.access_log:
        # one line per request either way; a streamed request's line has its timings
        logs.append(_file_log(opts.access_log, ACCESS_LOG_FORMAT, streamed=False))
        logs.append(_file_log(opts.access_log, STREAM_ACCESS_LOG_FORMAT, streamed=True))
    return logs


def _grpc_access_log() -> dict:
    return {
        # to the control plane, batched, for the Prometheus metrics
        "name": "envoy.access_loggers.http_grpc",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.grpc.v3.HttpGrpcAccessLogConfig",
            "common_config": {"log_name": "llm_gateway", "transport_api_version": "V3",
                              "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER}},
                              "buffer_flush_interval": "0.5s",
                              # a streamed answer's time points, read by the receiver
                              "custom_tags": [{"tag": tag, "value": value} for tag, value in STREAM_TIMINGS.items()]},
            "additional_response_headers_to_log": ["content-type"],
        },
    }


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


ROUTE_CONFIG_NAME = "llm_gateway"
ANY_HOST_ROUTE_CONFIG_NAME = "llm_gateway_any_host"
PASSTHROUGH_CLUSTER = "llm_gateway_passthrough"
_XDS_SOURCE = {
    "resource_api_version": "V3",
    "api_config_source": {
        "api_type": "GRPC",
        "transport_api_version": "V3",
        "grpc_services": [{"envoy_grpc": {"cluster_name": CONTROL_CLUSTER}}],
        "set_node_on_first_message_only": True,
    },
}


def _budget_headers(names: frozenset[str]) -> list[dict]:
    """An admitted request's x-ratelimit-* headers (`names`), from the values the ext_proc put
    in its dynamic metadata (no extra message). Without a budget the values are empty and Envoy
    adds nothing (keep_empty_value false). Only the headers the config's budgets can give:
    formatting each costs every answer a few microseconds (measured with scripts/bench)."""
    from .budgets import HEADER_METADATA

    return [{"header": {"key": name, "value": _meta(key)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
             "keep_empty_value": False} for name, key in HEADER_METADATA.items() if name in names]


def _llm_virtual_host(domains: list[str], route_timeout_s: int, clusters: list[str] = (),
                      body_limit: int = DEFAULT_BODY_LIMIT, budget_headers: frozenset[str] = frozenset()) -> dict:
    """`clusters`: the failover clusters (rules with `retries`); none, no failover route.
    `budget_headers`: the x-ratelimit-* headers the config's budgets give admitted answers."""
    vhost = {
        "name": "llm_gateway",
        "domains": domains,
        "request_headers_to_remove": [CLUSTER_HEADER],  # internal: never leaves Envoy
        # requests with an attempt order (rules with `retries`) fail over across providers
        "routes": ([failover_route(list(clusters), body_limit)] if clusters else []) + [
            {"match": {"prefix": "/"},
             "route": {"cluster_header": CLUSTER_HEADER, "timeout": f"{route_timeout_s}s"}}],
    }
    if clusters:
        vhost["include_request_attempt_count"] = True  # a retried attempt is told apart by it
    if budget_headers:
        vhost["response_headers_to_add"] = _budget_headers(budget_headers)
    return vhost


def any_host_route_configuration(clusters: list[str], body_limit: int = DEFAULT_BODY_LIMIT,
                                 budget_headers: frozenset[str] = frozenset()) -> dict:
    """The gateway's own routes (sent over RDS, as they name the provider clusters): every host
    through the ext_proc, which answers hosts it does not serve with a JSON 404."""
    return {"name": ANY_HOST_ROUTE_CONFIG_NAME,
            "virtual_hosts": [_llm_virtual_host(["*"], 0, clusters, body_limit, budget_headers)]}


def _untouched_route(cluster: str) -> dict:
    """A route to `cluster` with none of the gateway's filters: the request leaves as it came."""
    off = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": True}
    return {
        "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": "0s"},
        "typed_per_filter_config": {
            "envoy.filters.http.ext_proc": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
                "disabled": True},
            "envoy.filters.http.json_to_metadata": off,
            "llm_gateway.event_stream": off,
        },
    }


def route_configuration(hosts: list[str], route_timeout_s: int = 0, clusters: list[str] = (),
                        body_limit: int = DEFAULT_BODY_LIMIT, forwarded: dict[str, str] | None = None,
                        budget_headers: frozenset[str] = frozenset()) -> dict:
    """The sidecar's routes (sent over RDS): the LLM host names through the gateway, anything else
    to where the application sent it, with none of the gateway's filters on the way. `forwarded`
    (host -> cluster) are hosts an egress gateway decides: sent to its cluster as they came, Host
    kept (see `extproc.gateways`). A host in both (only while a change rolls out: the union of old
    and new) is forwarded: the gateway decides it, the sidecar's ext_proc would refuse it."""
    passthrough = {"name": "passthrough", "domains": ["*"], "routes": [_untouched_route(PASSTHROUGH_CLUSTER)]}
    forwarded = forwarded or {}
    hosts = sorted(set(hosts) - set(forwarded))
    by_cluster: dict[str, list[str]] = {}
    for host, cluster in sorted(forwarded.items()):
        by_cluster.setdefault(cluster, []).append(host)
    egress = [{"name": cluster, "domains": domains, "routes": [_untouched_route(cluster)]}
              for cluster, domains in sorted(by_cluster.items())]
    return {"name": ROUTE_CONFIG_NAME,
            "virtual_hosts": ([_llm_virtual_host(hosts, route_timeout_s, clusters, body_limit, budget_headers)]
                              if hosts else [])
            + egress + [passthrough]}


def to_route_proto(route_config: dict):
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401  (registers @type)

    clean, raw = with_raw_fields(route_config)
    message = json_format.ParseDict(clean, route_pb2.RouteConfiguration())
    add_raw_fields(message, raw)
    return message


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
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "llm_gateway",
        "codec_type": "AUTO",
        "http_filters": [
            {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            # The rewritten body, whole, with its content-length (a streamed body would go to the
            # provider chunked): some providers want the length.
            {"name": "envoy.filters.http.buffer",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                              "max_request_bytes": opts.body_limit + BUFFER_MARGIN}},
            {"name": "envoy.filters.http.json_to_metadata", "typed_config": _usage_from_json()},
            {"name": "llm_gateway.event_stream", "typed_config": _usage_from_event_stream()},
            {"name": "envoy.filters.http.router",
             "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                              "suppress_envoy_headers": True,
                              "upstream_log": upstream_logs(_grpc_access_log(), opts.access_log)}},
        ],
        "local_reply_config": _local_reply_config(opts.body_timeout_s),
        # silence allowed while waiting for an answer or between its bytes (streamed events);
        # there is no total bound unless a provider's spec.timeout sets one
        "stream_idle_timeout": f"{opts.idle_timeout_s:g}s",
        "access_log": _access_logs(opts),
    }
    listener = {
        "name": "llm_gateway_http",
        "address": _address(opts.listen),
        # above the body limit, which the ext_proc enforces (413): Envoy's flow control must not
        # stop reading a body the ext_proc is still waiting for
        "per_connection_buffer_limit_bytes": opts.body_limit + BUFFER_MARGIN,
        "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}],
    }
    from .drain import readiness_listener, replica_failover

    if opts.socket_dir is not None:
        clusters = [_grpc_cluster(CONTROL_CLUSTER, f"{opts.socket_dir}/xds.sock"),
                    _grpc_cluster(EXT_PROC_CLUSTER, f"{opts.socket_dir}/ext_proc.sock")]
    else:  # replicas behind a Service: health-checked, a dead one ejected (extproc.drain)
        clusters = [_grpc_cluster(CONTROL_CLUSTER, opts.control, opts.token_sds),
                    replica_failover(_grpc_cluster(EXT_PROC_CLUSTER, ext_proc_address(opts), opts.token_sds))]
    if opts.sidecar:
        hcm["rds"] = {"route_config_name": ROUTE_CONFIG_NAME, "config_source": _XDS_SOURCE}
        hcm["strip_any_host_port"] = True
        hcm["generate_request_id"] = False  # passthrough traffic leaves as it came
        listener["listener_filters"] = [{
            "name": "envoy.filters.listener.original_dst",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}}]
        clusters.append({"name": PASSTHROUGH_CLUSTER, "type": "ORIGINAL_DST", "lb_policy": "CLUSTER_PROVIDED",
                         "connect_timeout": "10s"})
    else:
        # One route for every host (over RDS: it names the provider clusters, see
        # any_host_route_configuration); the ext_proc answers hosts it does not serve with a 404.
        hcm["rds"] = {"route_config_name": ANY_HOST_ROUTE_CONFIG_NAME, "config_source": _XDS_SOURCE}
    return {
        "node": {"id": opts.node_id, "cluster": "llm-gateway"},
        "admin": {"address": _address(opts.admin)},
        "static_resources": {"listeners": [listener, *([readiness_listener(opts.readiness)] if opts.sidecar else [])],
                             "clusters": clusters},
        "dynamic_resources": {"cds_config": _XDS_SOURCE},
    }


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


def _grpc_cluster(name: str, address: HostPort | str, token_sds_file: str | None = None) -> dict:
    """A control-plane cluster: a Unix socket path (local mode) or HOST:PORT (TCP, with the token)."""
    options = {
        "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        "explicit_http_config": {"http2_protocol_options": {}},
    }
    if token_sds_file is not None:
        options["http_filters"] = _token_filters(token_sds_file)
    if isinstance(address, str):
        kind, endpoint = "STATIC", {"pipe": {"path": address}}
    else:
        kind, endpoint = "STATIC" if _is_ip(address.host) else "STRICT_DNS", _address(address)
    return {
        "name": name,
        "type": kind,
        "connect_timeout": "1s",
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": endpoint}}]}]},
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": options},
    }
