"""Failover's Envoy config: the route fields our protobuf package lacks, carried into the route's
protobuf as raw fields."""

from __future__ import annotations

from extproc.envoy.failover import add_raw_fields, failover_route, with_raw_fields


def test_route_proto_carries_the_fields_our_protobuf_package_lacks():
    from extproc.envoy.routes import any_host_route_configuration, to_route_proto

    message = to_route_proto(any_host_route_configuration(["c1", "c2"]))
    action = message.virtual_hosts[0].routes[0].route
    assert action.inline_cluster_specifier_plugin.extension.name == "envoy.router.cluster_specifier_plugin.matcher"
    assert b"c1" in action.inline_cluster_specifier_plugin.extension.typed_config.value
    assert bytes([14 << 3, 1]) in action.retry_policy.SerializeToString()  # refresh_cluster_on_retry
    assert message.virtual_hosts[0].routes[1].route.cluster_header  # rules without retries: as before
    clean, where = with_raw_fields({"virtual_hosts": [{"routes": [failover_route(["x"], 1 << 20)]}]})
    assert (where == [(0, 0, ["x"])]
            and "inline_cluster_specifier_plugin" not in clean["virtual_hosts"][0]["routes"][0]["route"])
    assert add_raw_fields  # used by to_route_proto above
