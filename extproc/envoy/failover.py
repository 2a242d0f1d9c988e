"""Envoy configuration for failover across providers (see docs/failover.md).

Three pieces, all static (no key, no provider list):
- a route taken only by requests whose rule has `retries` (the ext_proc then sets the attempt
  order): its cluster is read again from the cluster header for every retry, and each
  attempt's upstream filters set that header to the next cluster of the order;
- on every provider cluster, an upstream ext_proc that rewrites a retried attempt (key, host,
  path, model) for that cluster's provider. A matcher skips it on the first attempt, which the
  downstream ext_proc has already rewritten: the first attempt costs no extra round trip (but
  where the rule's providers speak several APIs: then every attempt's body is translated there);
- the router's upstream log: one entry per attempt, to the access-log service (per-attempt
  metrics, passive health) and to the JSON access log.
"""

from __future__ import annotations

# Imported for their side effect: registering the types that `@type` names below (the provider
# clusters are turned into protobuf for xDS).
from envoy.extensions.common.matching.v3 import extension_matcher_pb2  # noqa: F401
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.header_mutation.v3 import header_mutation_pb2  # noqa: F401
from envoy.extensions.filters.http.upstream_codec.v3 import upstream_codec_pb2  # noqa: F401
from envoy.type.matcher.v3 import http_inputs_pb2  # noqa: F401

from ..protocol import (
    ATTEMPT_HEADER,
    BUFFER_MARGIN,
    CLUSTER_HEADER,
    EXT_PROC_CLUSTER,
    METADATA_NAMESPACE,
    ORDER_HEADER,
    RETRY_AUTHORITY,
    TRANSLATE_HEADER,
    next_header,
)

# RetryPolicy.refresh_cluster_on_retry (field 14, Envoy 1.39+): the cluster is chosen again for each
# retry. The xds-protos package predates it, so over RDS it goes as a raw field (see to_route_proto).
REFRESH_CLUSTER_ON_RETRY = "refresh_cluster_on_retry"
_REFRESH_CLUSTER_ON_RETRY_WIRE = bytes([14 << 3, 1])


def with_raw_fields(route_config: dict) -> tuple[dict, list[tuple[int, int, list[str] | None]]]:
    """The route config without what our protobuf package lacks, and where it was (virtual
    host, route, matcher clusters), to be added back as raw fields by `add_raw_fields`."""
    import copy

    clean = copy.deepcopy(route_config)
    where = []
    for v, vhost in enumerate(clean.get("virtual_hosts", [])):
        for r, rt in enumerate(vhost.get("routes", [])):
            action = rt.get("route", {})
            policy = action.get("retry_policy")
            if policy is not None and policy.pop(REFRESH_CLUSTER_ON_RETRY, False):
                plugin = action.pop("inline_cluster_specifier_plugin", None)
                where.append((v, r, plugin["extension"]["clusters"] if plugin else None))
    return clean, where


def add_raw_fields(message, where) -> None:
    for v, r, clusters in where:
        action = message.virtual_hosts[v].routes[r].route
        action.retry_policy.MergeFromString(_REFRESH_CLUSTER_ON_RETRY_WIRE)
        if clusters is not None:
            extension = action.inline_cluster_specifier_plugin.extension
            extension.name = MATCHER_PLUGIN
            extension.typed_config.type_url = _MATCHER_URL
            extension.typed_config.value = matcher_specifier(clusters)


MATCHER_PLUGIN = "envoy.router.cluster_specifier_plugin.matcher"
_MATCHER_URL = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.MatcherClusterSpecifier"
_CLUSTER_ACTION_URL = "type.googleapis.com/envoy.extensions.router.cluster_specifiers.matcher.v3.ClusterAction"


def failover_route(clusters: list[str], body_limit: int) -> dict:
    """The route for rules with `retries`, chosen when the ext_proc set the attempt order. Its
    cluster comes from the cluster header through Envoy's matcher cluster specifier, which
    `refresh_cluster_on_retry` runs again for each retry (a plain `cluster_header` route, or a
    Lua specifier, keeps the first attempt's cluster in Envoy 1.40: seen end to end). Each
    attempt's upstream filters set that header to the next cluster of the order. No total
    timeout here (the ext_proc sets one per request where the config has one); retries follow
    at once: the next attempt goes to another provider, there is nothing to wait for."""
    return {
        "match": {"prefix": "/", "headers": [{"name": ORDER_HEADER, "present_match": True}]},
        # Envoy keeps a request body for retries only up to this; past it, no retry happens
        # (`request_body_buffer_limit`: `per_request_buffer_limit_bytes` is deprecated in 1.40)
        "request_body_buffer_limit": body_limit + BUFFER_MARGIN,
        "route": {
            "inline_cluster_specifier_plugin": {"extension": {"name": MATCHER_PLUGIN, "clusters": sorted(clusters)}},
            "timeout": "0s",
            "retry_policy": {"retry_back_off": {"base_interval": "0.001s", "max_interval": "0.002s"},
                             REFRESH_CLUSTER_ON_RETRY: True},
        },
    }


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field (the xds-protos package lacks the matcher specifier's types)."""
    size, length = bytearray(), len(payload)
    while True:
        byte = length & 0x7F
        length >>= 7
        size.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([number << 3 | 2]) + bytes(size) + payload


def matcher_specifier(clusters: list[str]) -> bytes:
    """MatcherClusterSpecifier: the cluster named by the cluster header, one of `clusters`."""
    from envoy.type.matcher.v3.http_inputs_pb2 import HttpRequestHeaderMatchInput
    from xds.type.matcher.v3 import matcher_pb2

    matcher = matcher_pb2.Matcher()
    tree = matcher.matcher_tree
    tree.input.name = "cluster"
    tree.input.typed_config.Pack(HttpRequestHeaderMatchInput(header_name=CLUSTER_HEADER))
    for cluster in clusters:
        action = tree.exact_match_map.map[cluster].action
        action.name = cluster
        action.typed_config.type_url = _CLUSTER_ACTION_URL
        action.typed_config.value = _field(1, cluster.encode())
    return _field(1, matcher.SerializeToString())


def retry_rewrite_filters(cluster: str, body_limit: int) -> list[dict]:
    """A provider cluster's upstream HTTP filters: the retry rewrite (skipped on attempt 1),
    then the codec."""
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        # its own authority: the ext_proc tells a retried attempt from a client's request by it
        "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER, "authority": RETRY_AUTHORITY,
                                        "max_receive_message_length": body_limit + BUFFER_MARGIN}},
        "failure_mode_allow": False,  # never an attempt with the previous provider's key
        "message_timeout": "5s",
        "processing_mode": {
            "request_header_mode": "SEND",
            "response_header_mode": "SKIP",
            "request_body_mode": "BUFFERED",
            "response_body_mode": "NONE",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
        # the request's decision (route, rule) comes in; the attempt's provider goes out
        "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]},
                             "receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        "stat_prefix": "retry",
    }
    first_attempt = {"single_predicate": {
        "input": {"name": "attempt", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": "x-envoy-attempt-count"}},
        "value_match": {"exact": "1"},
    }}
    # ... unless the request's providers speak several APIs: then the first attempt, too, has the
    # client's body translated for its provider (the ext_proc sets TRANSLATE_HEADER)
    translated = {"single_predicate": {
        "input": {"name": "translate", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": TRANSLATE_HEADER}},
        "value_match": {"exact": "1"},
    }}
    skip = {"and_matcher": {"predicate": [first_attempt, {"not_matcher": translated}]}}
    return [
        {"name": "llm_gateway.retry_rewrite", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
            "extension_config": {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
            "xds_matcher": {"matcher_list": {"matchers": [{
                "predicate": skip,
                "on_match": {"action": {"name": "skip", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
            }]}},
        }},
        # on every attempt: the cluster a retry of this attempt goes to (the route reads it again
        # for each retry; nothing when the request has no attempt order), and the attempt count
        # kept from the provider (Envoy sets it again for each retry) but for the attempt log,
        # which reads it from ATTEMPT_HEADER (Envoy's own count is 0 in an upstream log)
        {"name": "llm_gateway.next_attempt", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [{"append": {
                "header": {"key": CLUSTER_HEADER, "value": f"%REQ({next_header(cluster)})%"},
                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
                {"append": {"header": {"key": ATTEMPT_HEADER, "value": "%REQ(x-envoy-attempt-count)%"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
                {"remove": "x-envoy-attempt-count"}]},
        }},
        {"name": "envoy.filters.http.upstream_codec", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.upstream_codec.v3.UpstreamCodec"}},
    ]


# One JSON line per failed attempt (`"kind": "attempt"`), beside the request's own line.
ATTEMPT_LOG_FORMAT = {
    "kind": "attempt",
    "start_time": "%START_TIME%",
    "request_id": "%REQ(x-request-id)%",
    "attempt": f"%REQ({ATTEMPT_HEADER})%",  # 1 for the first attempt, 2 for the first retry, ...
    "upstream_cluster": "%UPSTREAM_CLUSTER%",
    "upstream_host": "%UPSTREAM_HOST%",
    "status": "%RESPONSE_CODE%",
    "flags": "%RESPONSE_FLAGS%",
    "failure": "%UPSTREAM_TRANSPORT_FAILURE_REASON%",
    "duration_ms": "%DURATION%",
}


def _status(op: str, code: int) -> dict:
    return {"status_code_filter": {"comparison": {"op": op, "value": {
        "default_value": code, "runtime_key": f"llm_gateway.attempt_log.{op.lower()}_{code}"}}}}


# Only failed attempts of requests with an attempt order are logged (5xx, 429, no answer at all).
# The header test comes first: a request of a rule without `retries` costs one header lookup
# here (its one attempt is read from its own entry); a first attempt that succeeds costs nothing
# more, its success reaches passive health through the request's own entry.
_FAILED_ATTEMPT = {"and_filter": {"filters": [
    {"header_filter": {"header": {"name": ORDER_HEADER, "present_match": True}}},
    {"or_filter": {"filters": [_status("GE", 500), _status("EQ", 429), _status("EQ", 0)]}}]}}


def upstream_logs(grpc_log: dict, access_log: str | None) -> list[dict]:
    """The router's per-attempt logs, for failed attempts: on the request log's own gRPC stream
    (the same config: one buffer, so a request's attempts arrive before the request itself)
    and, when there is one, to the JSON access log file."""
    logs = [{**grpc_log, "filter": _FAILED_ATTEMPT}]
    if access_log:
        logs.append({
            "name": "envoy.access_loggers.file",
            "filter": _FAILED_ATTEMPT,
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                             "path": access_log, "log_format": {"json_format": ATTEMPT_LOG_FORMAT}},
        })
    return logs
