"""The route configurations sent over RDS: the gateway's own (every host through the ext_proc),
and the sidecars' (the LLM host names through the gateway, forwarded hosts to their egress
gateway, everything else on untouched)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from google.protobuf import json_format

from ..policy.budgets import HEADER_METADATA
from ..protocol import ANSWER_HEADER, CLUSTER_HEADER, DEFAULT_BODY_LIMIT
from .access_logs import metadata_value
from .answer_filter import ANSWER_FILTER
from .answer_filter import ENABLED as ANSWER_FILTER_ON
from .answer_reader import ANSWER_READER
from .answer_reader import enabled as reader_on
from .failover import add_raw_fields, failover_route, with_raw_fields

ROUTE_CONFIG_NAME = "llm_gateway"


ANY_HOST_ROUTE_CONFIG_NAME = "llm_gateway_any_host"


PASSTHROUGH_CLUSTER = "llm_gateway_passthrough"


def _budget_headers(names: frozenset[str]) -> list[dict]:
    """An admitted request's x-ratelimit-* headers (`names`), from the values the ext_proc put
    in its dynamic metadata (no extra message). Without a budget the values are empty and Envoy
    adds nothing (keep_empty_value false). Only the headers the config's budgets can give:
    formatting each costs every answer a few microseconds (measured with scripts/bench)."""
    return [{"header": {"key": name, "value": metadata_value(key)}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD",
             "keep_empty_value": False} for name, key in HEADER_METADATA.items() if name in names]


def _llm_virtual_host(domains: list[str], route_timeout_s: int, clusters: Sequence[str] = (),
                      body_limit: int = DEFAULT_BODY_LIMIT, budget_headers: frozenset[str] = frozenset(),
                      reader: str | None = None) -> dict:
    """`clusters`: the failover clusters (rules with `retries`); none, no failover route.
    `budget_headers`: the x-ratelimit-* headers the config's budgets give admitted answers.
    `reader`: the answer reader's script where traces are exported (`extproc.envoy.answer_reader`)."""
    filters: dict[str, Any] = {ANSWER_FILTER: ANSWER_FILTER_ON}
    if reader is not None:
        filters[ANSWER_READER] = reader_on(reader)
    vhost: dict[str, Any] = {
        "name": "llm_gateway",
        "domains": domains,
        "request_headers_to_remove": [CLUSTER_HEADER, ANSWER_HEADER],  # internal: never leave Envoy
        # the answer filter, off by default, runs on the gateway's own routes (for marked requests)
        "typed_per_filter_config": filters,
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
                                 budget_headers: frozenset[str] = frozenset(), reader: str | None = None) -> dict:
    """The gateway's own routes (sent over RDS, as they name the provider clusters): every host
    through the ext_proc, which answers hosts it does not serve with a JSON 404."""
    return {"name": ANY_HOST_ROUTE_CONFIG_NAME,
            "virtual_hosts": [_llm_virtual_host(["*"], 0, clusters, body_limit, budget_headers, reader)]}


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
            ANSWER_FILTER: off,
        },
    }


def route_configuration(hosts: list[str], route_timeout_s: int = 0, clusters: Sequence[str] = (),
                        body_limit: int = DEFAULT_BODY_LIMIT, forwarded: dict[str, str] | None = None,
                        budget_headers: frozenset[str] = frozenset(), reader: str | None = None) -> dict:
    """The sidecar's routes (sent over RDS): the LLM host names through the gateway, anything else
    to where the application sent it, with none of the gateway's filters on the way. `forwarded`
    (host -> cluster) are hosts an egress gateway decides: sent to its cluster as they came, Host
    kept (see `extproc.policy.gateway_binding`). A host in both (only while a change rolls out: the union of old
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
            "virtual_hosts": ([_llm_virtual_host(hosts, route_timeout_s, clusters, body_limit, budget_headers, reader)]
                              if hosts else [])
            + egress + [passthrough]}


def to_route_proto(route_config: dict):
    from envoy.config.route.v3 import route_pb2
    from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401  (registers @type)
    from envoy.extensions.filters.http.lua.v3 import lua_pb2  # noqa: F401  (registers @type)

    clean, raw = with_raw_fields(route_config)
    message = json_format.ParseDict(clean, route_pb2.RouteConfiguration())
    add_raw_fields(message, raw)
    return message
