"""Nothing the gateway tells Envoy uses a field Envoy 1.40 marks deprecated: each such field costs
a long warning at every start and reload that no operator can act on (issue 29, cut 9). The
bootstrap, every kind of cluster and the route configurations, walked field by field (typed
configs unpacked where their type is known)."""

from __future__ import annotations

import pytest
from google.protobuf import any_pb2, symbol_database
from google.protobuf.message import Message

from extproc.envoy.answer_filter import answer_filter  # noqa: F401  (registers the matcher types)
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.envoy.clusters import UpstreamOptions, provider_cluster, to_cluster_proto
from extproc.envoy.routes import any_host_route_configuration, route_configuration, to_route_proto
from support.envoy_api import parse_bootstrap


def deprecated_fields(message: Message, path: str = "") -> list[str]:
    found = []
    for field, value in message.ListFields():
        where = f"{path}.{field.name}" if path else field.name
        if field.GetOptions().deprecated:
            found.append(where)
        if field.message_type is None:
            continue
        values = value.values() if field.message_type.GetOptions().map_entry else (
            value if field.is_repeated else [value])
        for item in values:
            if isinstance(item, any_pb2.Any):
                try:
                    inner = symbol_database.Default().GetSymbol(item.TypeName())()
                except KeyError:  # a type newer than xds-protos: Envoy itself checks it
                    continue
                item.Unpack(inner)
                found.extend(deprecated_fields(inner, f"{where}<{item.TypeName()}>"))
            elif isinstance(item, Message):
                found.extend(deprecated_fields(item, where))
    return found


@pytest.mark.parametrize("opts", [pytest.param(BootstrapOptions(), id="up"),
                                  pytest.param(BootstrapOptions(sidecar=True), id="sidecar")])
def test_the_bootstrap_uses_no_deprecated_field(opts):
    assert deprecated_fields(parse_bootstrap(bootstrap(opts))) == []


@pytest.mark.parametrize("failover", [False, True])
def test_clusters_use_no_deprecated_field(failover):
    cluster = provider_cluster("llm_provider_a", "a.example.com", UpstreamOptions(), failover=failover)
    assert deprecated_fields(to_cluster_proto(cluster)) == []


def test_routes_with_failover_use_no_deprecated_field():
    """A rule with `retries` brings the failover route (its body buffer for retries)."""
    clusters = ["llm_failover_a_example_com", "llm_failover_b_example_com"]
    for config in (any_host_route_configuration(clusters), route_configuration(["a.example.com"], clusters=clusters)):
        message = to_route_proto(config)
        assert message.virtual_hosts[0].routes[0].route.HasField("retry_policy")  # the failover route is there
        assert deprecated_fields(message) == []
