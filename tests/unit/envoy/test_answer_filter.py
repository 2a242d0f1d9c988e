"""The answer filter's Envoy config: off by default (an answer Envoy makes without a route, such as
a 400 to bad HTTP, never waits for it), on for the gateway's own virtual host, skipped there
for every request the ext_proc did not mark, and when it runs, the answer's headers and (where
asked for) its body to the ext_proc on a stream of its own, after the usage readers."""

from __future__ import annotations

from extproc.envoy.answer_filter import ANSWER_FILTER, answer_filter
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.envoy.routes import any_host_route_configuration, route_configuration, to_route_proto
from extproc.protocol import ANSWER_AUTHORITY, ANSWER_HEADER, METADATA_NAMESPACE
from support.envoy_api import hcm


def test_the_answer_filter_is_off_by_default_and_skips_unmarked_requests():
    config = answer_filter(1 << 20)
    assert config["name"] == ANSWER_FILTER and config["disabled"] is True
    wrapper = config["typed_config"]
    predicate = wrapper["xds_matcher"]["matcher_list"]["matchers"][0]["predicate"]["not_matcher"]["single_predicate"]
    assert predicate["input"]["typed_config"]["header_name"] == ANSWER_HEADER
    ext_proc = wrapper["extension_config"]["typed_config"]
    assert ext_proc["grpc_service"]["envoy_grpc"]["authority"] == ANSWER_AUTHORITY
    mode = ext_proc["processing_mode"]
    assert (mode["request_header_mode"], mode["request_body_mode"]) == ("SKIP", "NONE")  # the request is done
    assert (mode["response_header_mode"], mode["response_body_mode"]) == ("SEND", "BUFFERED")
    assert ext_proc["allow_mode_override"] is True  # the exchange asks for no body where nothing is converted
    assert ext_proc["failure_mode_allow"] is False  # never the wrong format silently
    assert ext_proc["metadata_options"]["forwarding_namespaces"]["untyped"] == [METADATA_NAMESPACE]
    # a translated answer's usage comes back into the request's metadata (Envoy's readers know OpenAI's only)
    assert ext_proc["metadata_options"]["receiving_namespaces"]["untyped"] == [METADATA_NAMESPACE]


def test_it_runs_after_the_usage_readers_on_the_way_back():
    names = [f["name"] for f in hcm(bootstrap(BootstrapOptions()))["http_filters"]]
    # answers pass the filters in reverse order: the readers first, so they read the provider's own answer
    assert names.index(ANSWER_FILTER) < names.index("envoy.filters.http.json_to_metadata")
    assert names.index(ANSWER_FILTER) < names.index("llm_gateway.event_stream")


def test_only_the_gateways_own_virtual_host_turns_it_on():
    for config in (any_host_route_configuration(["llm_failover_a"]),
                   route_configuration(["a.example.com"], forwarded={"b.example.com": "egress"})):
        to_route_proto(config)  # Envoy's API takes it
        on = [vh["name"] for vh in config["virtual_hosts"]
              if vh.get("typed_per_filter_config", {}).get(ANSWER_FILTER, {}).get("disabled") is False]
        assert on == ["llm_gateway"]
        assert ANSWER_HEADER in config["virtual_hosts"][0]["request_headers_to_remove"]
