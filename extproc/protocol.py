"""Names shared by the data plane (what answers Envoy per request) and Envoy's configuration.

Both halves must agree on every name here: a header the ext_proc sets and a route matches on,
a metadata namespace the ext_proc writes and an access-log format reads, a gRPC path Envoy
calls and the server dispatches. Written once, here, so they cannot drift apart.
"""

from __future__ import annotations

from envoy.data.accesslog.v3 import accesslog_pb2

# --- headers -----------------------------------------------------------------------------------

# The header the ext_proc sets to pick the upstream cluster. Envoy routes on it, then removes it
# before the request leaves; a client-sent value is always overwritten.
CLUSTER_HEADER = "x-llm-gateway-cluster"
# Prefix of every header internal to the gateway: stripped from client requests.
INTERNAL_HEADER_PREFIX = "x-llm-gateway-"
# Set by the ext_proc for a rule with `retries`: the clusters of the request's attempt order,
# comma-separated. Envoy's failover route picks attempt N's cluster from it.
ORDER_HEADER = "x-llm-gateway-order"
# Per cluster of an attempt order: the cluster a retry of that attempt goes to (`next_header`).
NEXT_HEADER_PREFIX = "x-llm-gateway-next-"
# Set on each attempt of a request with an attempt order, by the failover clusters' upstream
# filters: the attempt's number (Envoy's x-envoy-attempt-count, kept from the provider), for the
# log line of a failed attempt.
ATTEMPT_HEADER = "x-llm-gateway-attempt"
# The "next" cluster of an order's last attempt: there is none, a retry from there finds nothing.
NO_PROVIDER_CLUSTER = "llm_gateway_no_provider"
# Set by the ext_proc on a request whose answer comes back through it (the client's format may
# differ from the provider's: `extproc.policy.answer_format`): Envoy's answer filter runs only
# where it is set, and the route removes it before the request leaves.
ANSWER_HEADER = "x-llm-gateway-answer"
# Set by the ext_proc on a request of a rule with retries whose providers speak several APIs:
# its first attempt, too, passes the failover cluster's upstream ext_proc, which translates the
# client's body for each attempt's provider (`extproc.policy.answer_format.per_attempt`).
TRANSLATE_HEADER = "x-llm-gateway-translate"


# Per cluster of a pool of model servers: the endpoint ("ip:port") the ext_proc picked for it.
# Envoy's ORIGINAL_DST cluster of that name sends the request there (`extproc.envoy.pools`);
# internal (the prefix above): a client's value never reaches Envoy's router.
ENDPOINT_HEADER_PREFIX = "x-llm-gateway-endpoint-"


def endpoint_header(cluster: str) -> str:
    """The request header naming the endpoint a pool cluster sends the request to."""
    return ENDPOINT_HEADER_PREFIX + cluster


def next_header(cluster: str) -> str:
    """The request header that names the cluster after `cluster` in a request's attempt order."""
    return NEXT_HEADER_PREFIX + cluster


# --- dynamic metadata and Envoy's reasons ----------------------------------------------------------

# Dynamic metadata namespace the ext_proc writes (the decision) and Envoy's filters add to (the
# answer's model and usage); the access logs read it.
METADATA_NAMESPACE = "llm_gateway"
# Keys of that namespace Envoy's answer reader writes for spans (extproc.envoy.answer_reader): the
# answer's finish reason, and where contents are captured, its first bytes.
FINISH_REASON_KEY = "finish_reason"
ANSWER_SAMPLE_KEY = "answer_sample"
# `response_code_details` of every answer the ext_proc made itself: `llm_gateway_<error code>`.
GATEWAY_DETAILS_PREFIX = "llm_gateway_"
# `response_code_details` of a request the ext_proc cluster's circuit breakers refused (Envoy fails
# the ext_proc stream with gRPC UNAVAILABLE and names the overflow in its reason); a provider
# cluster's refusal has Envoy's UO response flag instead.
EXT_PROC_OVERFLOW_DETAILS = ("ext_proc_error_gRPC_error_14", "overflow")  # starts with, contains

# --- clusters ----------------------------------------------------------------------------------

# Envoy's static cluster for this process's xDS server (grpcio).
CONTROL_CLUSTER = "llm_gateway_control"
# Envoy's static cluster for what every request passes through: the ext_proc (a lean HTTP/2
# server, on the next port).
EXT_PROC_CLUSTER = "llm_gateway_ext_proc"
# The same server, for the access log service: a cluster of its own, so that the ext_proc's limit
# of streams (extproc.policy.capacity) never refuses the access log, whose entries count refusals.
ACCESS_LOG_CLUSTER = "llm_gateway_access_log"
# Prefix of every provider cluster: `llm_provider_<host with dots as underscores>`.
PROVIDER_CLUSTER_PREFIX = "llm_provider_"
# Prefix of a provider's second cluster, for rules with `retries` only: `llm_failover_<host>`. It
# carries the upstream filters that rewrite a retried attempt; requests of other rules go to the
# plain cluster and pay nothing for failover.
FAILOVER_CLUSTER_PREFIX = "llm_failover_"
# Prefix of a pool's third cluster, for rules with `retries`: the attempt after the pool's first,
# sent to the next endpoint the picker ranked (its own endpoint header): `llm_retry_<host>`.
RETRY_CLUSTER_PREFIX = "llm_retry_"
PROVIDER_CLUSTER_PREFIXES = (PROVIDER_CLUSTER_PREFIX, FAILOVER_CLUSTER_PREFIX, RETRY_CLUSTER_PREFIX)
FAILOVER_ROUTE_PREFIXES = (FAILOVER_CLUSTER_PREFIX, RETRY_CLUSTER_PREFIX)  # the clusters the failover route names


def provider_cluster(host: str) -> str:
    """Cluster name for a provider host. Host names have no '_', so the mapping is one to one,
    and without dots the name reads as a single tag in Envoy's stats."""
    return PROVIDER_CLUSTER_PREFIX + host.replace(".", "_")


def failover_cluster(host: str) -> str:
    """The provider's cluster for requests of rules with `retries` (see FAILOVER_CLUSTER_PREFIX)."""
    return FAILOVER_CLUSTER_PREFIX + host.replace(".", "_")


def retry_cluster(host: str) -> str:
    """A pool's cluster for a retry on another endpoint (see RETRY_CLUSTER_PREFIX)."""
    return RETRY_CLUSTER_PREFIX + host.replace(".", "_")


def host_of_cluster(cluster: str) -> str | None:
    """The provider host a provider cluster (either kind) was named for."""
    for prefix in PROVIDER_CLUSTER_PREFIXES:
        if cluster.startswith(prefix):
            return cluster[len(prefix):].replace("_", ".")
    return None


# An egress gateway's static cluster to the control plane of the sidecars, which issues the
# gateway's own certificate and the bundle its callers' certificates must chain to (SDS).
CERTIFICATES_CLUSTER = "llm_gateway_certificates"

# --- workload certificates (SDS) -------------------------------------------------------------------

# The secret an Envoy asks the control plane for to get its own workload certificate (the identity
# its credentials prove), and the one holding the CA bundle workload certificates chain to: the
# names Istio's agent serves them under.
WORKLOAD_SECRET = "default"
TRUST_BUNDLE_SECRET = "ROOTCA"
# What the egress gateway's Envoy tells its ext_proc of the connection a request came on: the
# client certificate's first URI SAN (its SPIFFE ID) and its subject (the pod), as attributes of
# the request's headers message, under the ext_proc filter's own name.
PEER_URI_ATTRIBUTE = "connection.uri_san_peer_certificate"
PEER_SUBJECT_ATTRIBUTE = "connection.subject_peer_certificate"
ATTRIBUTES_KEY = "envoy.filters.http.ext_proc"

# --- gRPC methods Envoy calls on the data plane --------------------------------------------------

PROCESS = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
STREAM_ACCESS_LOGS = "/envoy.service.accesslog.v3.AccessLogService/StreamAccessLogs"
HEALTH_CHECK = "/grpc.health.v1.Health/Check"
# The gRPC authority of the upstream ext_proc that rewrites a retried attempt for its provider:
# the same Process method, told apart by it (served as RETRY_AUTHORITY + PROCESS).
RETRY_AUTHORITY = "llm-gateway-retry"
# The gRPC authority of the answer filter's ext_proc (`extproc.dataplane.answer_exchange`): the
# answer of a request that set ANSWER_HEADER, on a stream of its own (served as ANSWER_AUTHORITY + PROCESS).
ANSWER_AUTHORITY = "llm-gateway-answer"
# An access-log entry of one attempt (the router's upstream log), not of a whole request.
UPSTREAM_END = accesslog_pb2.AccessLogType.Value("UpstreamEnd")

# Local mode: the control plane's Unix sockets, in a directory only the gateway's user can open.
XDS_SOCKET, EXT_PROC_SOCKET = "xds.sock", "ext_proc.sock"

# --- sizes both halves size by ---------------------------------------------------------------------

DEFAULT_BODY_LIMIT = 8 * 1024 * 1024  # the largest request body accepted (--body-limit)
# Envoy's buffers are this much above the body limit, which the ext_proc enforces itself (413):
# Envoy's flow control must never stop reading a body the ext_proc is still waiting for.
BUFFER_MARGIN = 1 << 20
