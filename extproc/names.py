"""Names shared by the ext_proc, the xDS server and the Envoy bootstrap."""

from __future__ import annotations

# The header the ext_proc sets to pick the upstream cluster. Envoy routes on it, then removes it
# before the request leaves; a client-sent value is always overwritten.
CLUSTER_HEADER = "x-llm-gateway-cluster"
# Prefix of every header internal to the gateway: stripped from client requests.
INTERNAL_HEADER_PREFIX = "x-llm-gateway-"

# Envoy's static cluster for this process's xDS server (grpcio).
CONTROL_CLUSTER = "llm_gateway_control"
# Envoy's static cluster for what every request passes through: the ext_proc and the access log
# service (a lean HTTP/2 server, on the next port).
EXT_PROC_CLUSTER = "llm_gateway_ext_proc"
# Prefix of every provider cluster: `llm_provider_<host with dots as underscores>`.
PROVIDER_CLUSTER_PREFIX = "llm_provider_"

# Dynamic metadata namespace the ext_proc writes for access logs.
METADATA_NAMESPACE = "llm_gateway"


# Prefix of a provider's second cluster, for rules with `retries` only: `llm_failover_<host>`. It
# carries the upstream filters that rewrite a retried attempt; requests of other rules go to the
# plain cluster and pay nothing for failover.
FAILOVER_CLUSTER_PREFIX = "llm_failover_"
PROVIDER_CLUSTER_PREFIXES = (PROVIDER_CLUSTER_PREFIX, FAILOVER_CLUSTER_PREFIX)


def provider_cluster(host: str) -> str:
    """Cluster name for a provider host. Host names have no '_', so the mapping is one to one,
    and without dots the name reads as a single tag in Envoy's stats."""
    return PROVIDER_CLUSTER_PREFIX + host.replace(".", "_")


def failover_cluster(host: str) -> str:
    """The provider's cluster for requests of rules with `retries` (see FAILOVER_CLUSTER_PREFIX)."""
    return FAILOVER_CLUSTER_PREFIX + host.replace(".", "_")


def host_of_cluster(cluster: str) -> str | None:
    """The provider host a provider cluster (either kind) was named for."""
    for prefix in PROVIDER_CLUSTER_PREFIXES:
        if cluster.startswith(prefix):
            return cluster[len(prefix):].replace("_", ".")
    return None

# Set by the ext_proc for a rule with `retries`: the clusters of the request's attempt order,
# comma-separated. Envoy's failover route picks attempt N's cluster from it.
ORDER_HEADER = "x-llm-gateway-order"
# The gRPC authority of the upstream ext_proc that rewrites a retried attempt for its provider.
RETRY_AUTHORITY = "llm-gateway-retry"
