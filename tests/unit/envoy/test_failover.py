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


def test_the_retry_rewrite_skips_a_first_attempt_unless_every_attempt_is_translated():
    from extproc.envoy.failover import retry_rewrite_filters
    from extproc.protocol import TRANSLATE_HEADER

    matcher = retry_rewrite_filters("llm_failover_a", 1 << 20)[0]["typed_config"]["xds_matcher"]
    (rule,) = matcher["matcher_list"]["matchers"]
    assert rule["on_match"]["action"]["name"] == "skip"
    first, not_translated = rule["predicate"]["and_matcher"]["predicate"]
    assert first["single_predicate"]["input"]["typed_config"]["header_name"] == "x-envoy-attempt-count"
    assert first["single_predicate"]["value_match"] == {"exact": "1"}
    header = not_translated["not_matcher"]["single_predicate"]
    assert header["input"]["typed_config"]["header_name"] == TRANSLATE_HEADER
    assert header["value_match"] == {"exact": "1"}
