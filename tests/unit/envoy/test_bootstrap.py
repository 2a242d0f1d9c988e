"""The Envoy bootstrap and the provider clusters sent over xDS."""

from __future__ import annotations

import json
import subprocess

import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.extensions.transport_sockets.tls.v3 import common_pb2, tls_pb2

from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import bootstrap, BootstrapOptions
from extproc.envoy.clusters import provider_cluster, to_cluster_proto, UpstreamOptions
from extproc.envoy.routes import ANY_HOST_ROUTE_CONFIG_NAME, any_host_route_configuration, PASSTHROUGH_CLUSTER, ROUTE_CONFIG_NAME, route_configuration, to_route_proto
from extproc.protocol import CLUSTER_HEADER, CONTROL_CLUSTER, EXT_PROC_CLUSTER, ORDER_HEADER
from extproc.ops.up import envoy_binary
from support.envoy_api import ext_proc, hcm, parse_bootstrap


@pytest.mark.parametrize("body_limit", [pytest.param(1024, id="1KiB"), pytest.param(8 * 1024 * 1024, id="8MiB"),
                                        pytest.param(50_000_000, id="50MB")])
def test_bootstrap_filters_and_limits(body_limit):
    boot = bootstrap(BootstrapOptions(body_limit=body_limit))
    names = [f["name"] for f in hcm(boot)["http_filters"]]
    # the request ext_proc first, the answer's readers next, the router last
    assert names == ["envoy.filters.http.ext_proc", "envoy.filters.http.buffer", "envoy.filters.http.json_to_metadata",
                     "llm_gateway.event_stream", "envoy.filters.http.router"]
    proc = ext_proc(boot)
    assert proc["failure_mode_allow"] is False
    # the body streamed right behind the headers: the ext_proc answers both in one round trip
    assert proc["processing_mode"]["request_body_mode"] == "STREAMED"
    assert proc["processing_mode"]["request_header_mode"] == "SEND"
    assert proc["send_body_without_waiting_for_header_response"] is True
    assert proc["grpc_service"]["envoy_grpc"]["cluster_name"] == EXT_PROC_CLUSTER
    assert proc["grpc_service"]["envoy_grpc"]["max_receive_message_length"] > body_limit
    assert proc["mutation_rules"]["allow_all_routing"] is True  # needed to set :authority and the cluster header
    listener = boot["static_resources"]["listeners"][0]
    # the ext_proc enforces the limit (413); Envoy's buffers leave room above it
    assert listener["per_connection_buffer_limit_bytes"] > body_limit


def test_bootstrap_routes_on_the_cluster_header():
    # Changed with failover (docs/failover.md): the routes name the provider clusters, so they
    # come over RDS; requests without an attempt order still route on the cluster header alone.
    assert hcm(bootstrap(BootstrapOptions()))["rds"]["route_config_name"] == ANY_HOST_ROUTE_CONFIG_NAME
    route_config = any_host_route_configuration(["llm_provider_a"])
    routes = [r for vh in route_config["virtual_hosts"] for r in vh["routes"]]
    assert len(routes) == 2 and routes[0]["match"]["headers"][0]["name"] == ORDER_HEADER
    assert routes[1]["route"]["cluster_header"] == CLUSTER_HEADER
    assert "cluster" not in routes[1]["route"]
    assert routes[1]["match"] == {"prefix": "/"}
    assert CLUSTER_HEADER in route_config["virtual_hosts"][0]["request_headers_to_remove"]  # never sent upstream
    assert [r["match"] for r in any_host_route_configuration([])["virtual_hosts"][0]["routes"]] == [{"prefix": "/"}]


def test_sidecar_bootstrap_takes_routes_over_rds_and_passes_other_traffic_through():
    boot = bootstrap(BootstrapOptions(listen=HostPort("0.0.0.0", 15001), sidecar=True))
    manager = hcm(boot)
    assert "route_config" not in manager and manager["rds"]["route_config_name"] == ROUTE_CONFIG_NAME
    assert manager["strip_any_host_port"] is True
    listener = boot["static_resources"]["listeners"][0]
    assert listener["listener_filters"][0]["name"] == "envoy.filters.listener.original_dst"
    passthrough = [c for c in boot["static_resources"]["clusters"] if c["name"] == PASSTHROUGH_CLUSTER]
    assert passthrough and passthrough[0]["type"] == "ORIGINAL_DST"
    parse_bootstrap(boot)


def test_sidecar_route_configuration():
    config = route_configuration(["svc.default", "dashscope.aliyuncs.com", "svc.default"])
    llm, passthrough = config["virtual_hosts"]
    assert llm["domains"] == ["dashscope.aliyuncs.com", "svc.default"]
    assert llm["routes"][0]["route"]["cluster_header"] == CLUSTER_HEADER
    assert passthrough["domains"] == ["*"]
    route = passthrough["routes"][0]
    assert route["route"]["cluster"] == PASSTHROUGH_CLUSTER
    assert set(route["typed_per_filter_config"]) == {"envoy.filters.http.ext_proc", "envoy.filters.http.json_to_metadata",
                                                    "llm_gateway.event_stream"}
    assert "request_headers_to_remove" not in passthrough  # other traffic leaves untouched
    to_route_proto(config)  # valid Envoy API
    assert [vh["name"] for vh in route_configuration([])["virtual_hosts"]] == ["passthrough"]


@pytest.mark.parametrize(("opts", "listen", "control_type", "ext_proc"), [
    pytest.param(BootstrapOptions(), ("127.0.0.1", 10000), "STATIC", ("127.0.0.1", 18001), id="defaults"),
    pytest.param(BootstrapOptions(listen=HostPort("0.0.0.0", 8080), control=HostPort("extproc", 18000)),
                 ("0.0.0.0", 8080), "STRICT_DNS", ("extproc", 18001), id="control-by-name"),
    pytest.param(BootstrapOptions(listen=HostPort("::", 8080), control=HostPort("::1", 18000)),
                 ("::", 8080), "STATIC", ("::1", 18001), id="ipv6"),
    pytest.param(BootstrapOptions(control=HostPort("127.0.0.1", 18000), ext_proc=HostPort("127.0.0.1", 9000)),
                 ("127.0.0.1", 10000), "STATIC", ("127.0.0.1", 9000), id="ext-proc-elsewhere"),
])
def test_bootstrap_addresses(opts, listen, control_type, ext_proc):
    boot = bootstrap(opts)
    address = boot["static_resources"]["listeners"][0]["address"]["socket_address"]
    assert (address["address"], address["port_value"]) == listen
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}

    def endpoint(cluster: dict) -> tuple[str, int]:
        socket = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        return socket["address"], socket["port_value"]

    assert clusters[CONTROL_CLUSTER]["type"] == control_type
    assert endpoint(clusters[CONTROL_CLUSTER]) == (opts.control.host, opts.control.port)
    assert endpoint(clusters[EXT_PROC_CLUSTER]) == ext_proc
    assert boot["dynamic_resources"]["cds_config"]["api_config_source"]["grpc_services"][0]["envoy_grpc"][
        "cluster_name"] == CONTROL_CLUSTER
    parsed = parse_bootstrap(boot)  # valid Envoy API, every @type known
    assert parsed.static_resources.listeners[0].per_connection_buffer_limit_bytes.value > opts.body_limit


def test_bootstrap_holds_no_provider():
    text = repr(bootstrap(BootstrapOptions()))
    assert "llm_provider_" not in text and "Bearer" not in text


def tls(cluster_msg: cluster_pb2.Cluster) -> tls_pb2.UpstreamTlsContext:
    ctx = tls_pb2.UpstreamTlsContext()
    assert cluster_msg.transport_socket.typed_config.Unpack(ctx)
    return ctx


@pytest.mark.parametrize(("host", "resolve", "address", "port", "cluster_type"), [
    pytest.param("dashscope.aliyuncs.com", {}, "dashscope.aliyuncs.com", 443, cluster_pb2.Cluster.LOGICAL_DNS,
                 id="name-default-port"),
    pytest.param("api.moonshot.cn", {"api.moonshot.cn": HostPort("127.0.0.1", 8443)}, "127.0.0.1", 8443,
                 cluster_pb2.Cluster.STATIC, id="resolve-to-ipv4"),
    pytest.param("api.moonshot.cn", {"api.moonshot.cn": HostPort("::1", 9443)}, "::1", 9443,
                 cluster_pb2.Cluster.STATIC, id="resolve-to-ipv6"),
    pytest.param("api.moonshot.cn", {"api.moonshot.cn": HostPort("fake-provider", 443)}, "fake-provider", 443,
                 cluster_pb2.Cluster.LOGICAL_DNS, id="resolve-to-other-name"),
    pytest.param("api.moonshot.cn", {"dashscope.aliyuncs.com": HostPort("127.0.0.1", 1)}, "api.moonshot.cn", 443,
                 cluster_pb2.Cluster.LOGICAL_DNS, id="resolve-for-other-host-ignored"),
])
def test_provider_cluster(host, resolve, address, port, cluster_type):
    name = "llm_provider_x"
    cluster = provider_cluster(name, host, UpstreamOptions(resolve=resolve, ca_file="/tmp/ca.pem"))
    msg = to_cluster_proto(cluster)
    assert msg.name == name
    assert msg.type == cluster_type
    endpoint = msg.load_assignment.endpoints[0].lb_endpoints[0].endpoint
    assert (endpoint.address.socket_address.address, endpoint.address.socket_address.port_value) == (address, port)
    assert endpoint.hostname == host
    ctx = tls(msg)
    assert ctx.sni == host  # SNI is the provider host whatever address is dialled
    validation = ctx.common_tls_context.validation_context
    assert validation.trusted_ca.filename == "/tmp/ca.pem"
    sans = [(m.san_type, m.matcher.exact) for m in validation.match_typed_subject_alt_names]
    assert sans == [(common_pb2.SubjectAltNameMatcher.DNS, host)]
    assert msg.HasField("typed_dns_resolver_config") is (cluster_type == cluster_pb2.Cluster.LOGICAL_DNS)


@pytest.mark.parametrize("failover", [False, True])
def test_only_a_failover_cluster_carries_the_retry_rewrite(failover):
    """Requests of rules without `retries` go to the plain cluster: no upstream filters (Envoy's
    default codec), Envoy's default buffer limit and retry budget: they pay nothing for failover."""
    cluster = provider_cluster("c", "a.example.com", UpstreamOptions(body_limit=4 << 20), failover=failover)
    msg = to_cluster_proto(cluster)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    names = [f["name"] for f in options.get("http_filters", [])]
    if failover:
        assert names == ["llm_gateway.retry_rewrite", "llm_gateway.next_attempt", "envoy.filters.http.upstream_codec"]
        assert msg.per_connection_buffer_limit_bytes.value == (4 << 20) + (1 << 20)
        assert msg.circuit_breakers.thresholds[0].max_retries.value == 100_000
    else:
        assert names == []
        assert not msg.HasField("per_connection_buffer_limit_bytes") and not msg.HasField("circuit_breakers")


def test_provider_cluster_connect_timeout():
    msg = to_cluster_proto(provider_cluster("c", "a.example.com", UpstreamOptions(connect_timeout_s=2.5)))
    assert msg.connect_timeout.ToMilliseconds() == 2500


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("127.0.0.1:8443", HostPort("127.0.0.1", 8443), id="ipv4"),
    pytest.param("[::1]:8443", HostPort("::1", 8443), id="ipv6-bracketed"),
    pytest.param(":9000", HostPort("127.0.0.1", 9000), id="port-only"),
    pytest.param("fake:443", HostPort("fake", 443), id="name"),
])
def test_host_port_parse(text, expected):
    assert HostPort.parse(text) == expected


@pytest.mark.parametrize("text", [pytest.param("nohost", id="no-port"), pytest.param("h:port", id="not-a-number"),
                                  pytest.param("h:70000", id="port-too-big"), pytest.param("h:", id="empty-port")])
def test_host_port_parse_rejects(text):
    with pytest.raises(ValueError):
        HostPort.parse(text)


def test_event_streams_read_by_envoy_into_the_same_metadata_keys():
    reader = next(f for f in hcm(bootstrap(BootstrapOptions()))["http_filters"]
                  if f["name"] == "llm_gateway.event_stream")["typed_config"]
    assert reader["@type"] == "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata"
    parser = reader["response_rules"]["content_parser"]["typed_config"]
    written = [(tuple(s["key"] for s in r["rule"]["selectors"]), r["rule"]["on_present"]["metadata_namespace"],
                r["rule"]["on_present"]["key"]) for r in parser["rules"]]
    assert written == [(("model",), "llm_gateway", "response_model"),
                       (("usage", "prompt_tokens"), "llm_gateway", "prompt_tokens"),
                       (("usage", "completion_tokens"), "llm_gateway", "completion_tokens"),
                       (("usage", "total_tokens"), "llm_gateway", "total_tokens"),
                       (("error", "code"), "llm_gateway", "stream_error"),
                       (("error", "type"), "llm_gateway", "stream_error")]  # the type, when there is one, wins
    # every event names the model: it is written once, not once per event
    assert [r.get("stop_processing_after_matches", 0) for r in parser["rules"]] == [1, 0, 0, 0, 0, 0]
    # no ext_proc reads answers: one ext_proc filter, for requests
    boot = bootstrap(BootstrapOptions())
    assert [f["name"] for f in hcm(boot)["http_filters"]].count("envoy.filters.http.ext_proc") == 1
    assert "ExtProc" not in json.dumps(reader) and "ExternalProcessor" not in json.dumps(reader)


@pytest.mark.parametrize("opts", [pytest.param(BootstrapOptions(), id="default"),
                                  pytest.param(BootstrapOptions(sidecar=True, access_log=None), id="sidecar-no-file-log")])
def test_envoy_accepts_the_bootstrap(tmp_path, opts):
    """The real Envoy checks every field, the ones xds-protos does not know included."""
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap(opts)))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_streamed_answer_timings_sent_to_the_metrics_as_time_points():
    (grpc_log, *_) = hcm(bootstrap(BootstrapOptions()))["access_log"]
    config = grpc_log["typed_config"]
    tags = {t["tag"]: t["value"] for t in config["common_config"]["custom_tags"]}
    assert tags == {"ttft_us": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:us)%",
                    "generation_us": "%COMMON_DURATION(US_RX_BODY_BEG:US_RX_END:us)%"}
    assert config["additional_response_headers_to_log"] == ["content-type"]


@pytest.mark.parametrize("access_log", ["/dev/stdout", "/tmp/x.log", None])
def test_access_logs(access_log):
    logs = hcm(bootstrap(BootstrapOptions(access_log=access_log)))["access_log"]
    assert logs[0]["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == EXT_PROC_CLUSTER
    if access_log is None:
        assert len(logs) == 1
    else:
        # one line per request: a streamed request's line (the ext_proc's `stream` decision) has its timings
        (_, plain, streamed) = logs
        stream_test, plain_test = streamed["filter"]["metadata_filter"], plain["filter"]["metadata_filter"]
        assert stream_test["matcher"]["path"] == plain_test["matcher"]["path"] == [{"key": "stream"}]
        assert stream_test["matcher"]["value"] == {"bool_match": True} and plain_test["matcher"]["value"] == {"bool_match": False}
        assert not stream_test["match_if_key_not_found"] and plain_test["match_if_key_not_found"]  # no decision: plain
        for log in (plain, streamed):
            fmt = log["typed_config"]["log_format"]["json_format"]
            assert log["typed_config"]["path"] == access_log
            for key in ("route", "rule", "provider", "request_model", "response_model", "prompt_tokens",
                        "completion_tokens", "total_tokens", "ttft_ms", "generation_ms", "status", "duration_ms"):
                assert key in fmt
        assert streamed["typed_config"]["log_format"]["json_format"]["ttft_ms"] == \
            "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%"
        assert plain["typed_config"]["log_format"]["json_format"]["ttft_ms"].startswith("%DYNAMIC_METADATA")
