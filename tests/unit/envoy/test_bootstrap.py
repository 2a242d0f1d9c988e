"""The Envoy bootstrap: its filters and limits, listeners and addresses, the control plane's and
the ext_proc's clusters, and that the real Envoy accepts it."""

from __future__ import annotations

import json
import subprocess

import pytest

from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.envoy.routes import (
    ANY_HOST_ROUTE_CONFIG_NAME,
    PASSTHROUGH_CLUSTER,
    ROUTE_CONFIG_NAME,
    any_host_route_configuration,
)
from extproc.ops.up import envoy_binary
from extproc.protocol import ANSWER_HEADER, CLUSTER_HEADER, CONTROL_CLUSTER, EXT_PROC_CLUSTER, ORDER_HEADER
from support.envoy_api import ext_proc, hcm, parse_bootstrap


@pytest.mark.parametrize("body_limit", [pytest.param(1024, id="1KiB"), pytest.param(8 * 1024 * 1024, id="8MiB"),
                                        pytest.param(50_000_000, id="50MB")])
def test_bootstrap_filters_and_limits(body_limit):
    boot = bootstrap(BootstrapOptions(body_limit=body_limit))
    names = [f["name"] for f in hcm(boot)["http_filters"]]
    # the request ext_proc first, then the answer filter: on the way back it runs after the answer's
    # readers, which so read the provider's own answer; the router last
    assert names == ["envoy.filters.http.ext_proc", "llm_gateway.answer", "envoy.filters.http.buffer",
                     "envoy.filters.http.json_to_metadata", "llm_gateway.event_stream", "envoy.filters.http.router"]
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
    assert {CLUSTER_HEADER, ANSWER_HEADER} <= set(route_config["virtual_hosts"][0]["request_headers_to_remove"])
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


@pytest.mark.parametrize("opts", [pytest.param(BootstrapOptions(), id="default"),
                                  pytest.param(BootstrapOptions(sidecar=True, access_log=None),
                                               id="sidecar-no-file-log"),
                                  pytest.param(BootstrapOptions(max_ext_proc_streams=50,
                                                                max_downstream_connections=9_000),
                                               id="limits-as-up-sets-them")])
def test_envoy_accepts_the_bootstrap(tmp_path, opts):
    """The real Envoy checks every field, the ones xds-protos does not know included."""
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(bootstrap(opts)))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_ext_proc_cluster_is_health_checked_and_a_dead_replica_ejected():
    from envoy.config.cluster.v3 import cluster_pb2
    from google.protobuf import json_format

    import support.envoy_api  # noqa: F401  (registers every @type the bootstrap uses)
    from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
    from extproc.protocol import CONTROL_CLUSTER, EXT_PROC_CLUSTER

    boot = bootstrap(BootstrapOptions(control=HostPort("llm-gateway-control.llm-gateway.svc", 18000), sidecar=True))
    # valid Envoy API (the clusters: the whole bootstrap names filters newer than xds-protos)
    clusters = {c["name"]: json_format.ParseDict(c, cluster_pb2.Cluster())
                for c in boot["static_resources"]["clusters"]}
    ext_proc = clusters[EXT_PROC_CLUSTER]
    (check,) = ext_proc.health_checks
    assert check.HasField("grpc_health_check") and check.unhealthy_threshold.value == 1
    assert ext_proc.outlier_detection.consecutive_local_origin_failure.value == 1
    assert not clusters[CONTROL_CLUSTER].health_checks  # grpcio's xDS: Envoy reconnects elsewhere by itself
    listeners = {listener["name"]: listener for listener in boot["static_resources"]["listeners"]}
    assert listeners["llm_gateway_readiness"]["address"]["socket_address"]["port_value"] == 15021


@pytest.mark.parametrize("socket_dir, token_sds, kind", [
    ("/run/gw", None, "pipe"), (None, "/etc/gw/token-sds.json", "token"), (None, None, "plain"),
])
def test_control_plane_clusters(socket_dir, token_sds, kind):
    from extproc.envoy.bootstrap import TOKEN_SECRET, BootstrapOptions, bootstrap

    boot = bootstrap(BootstrapOptions(socket_dir=socket_dir, token_sds=token_sds))
    clusters = boot["static_resources"]["clusters"][:2]
    for cluster, sock in zip(clusters, ("xds.sock", "ext_proc.sock"), strict=False):
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        filters = [f["name"] for f in options.get("http_filters", [])]
        if kind == "pipe":
            assert address == {"pipe": {"path": f"/run/gw/{sock}"}} and not filters
        else:
            assert "socket_address" in address
            assert filters == (["envoy.filters.http.credential_injector", "envoy.filters.http.upstream_codec"]
                               if kind == "token" else [])
    if kind == "token":
        injector = options["http_filters"][0]["typed_config"]["credential"]["typed_config"]
        assert injector["credential"] == {"name": TOKEN_SECRET, "sds_config": {
            "path_config_source": {"path": token_sds}, "resource_api_version": "V3"}}
        assert injector["header"] == "authorization" and injector["header_value_prefix"] == "Bearer "


def test_a_provider_without_an_address_gets_a_clear_json_503():
    """Envoy's own answer when a provider's cluster has no host (its name has not resolved):
    `provider_address_unknown`, `server_error`, naming the provider host (the request's
    authority, set by the ext_proc); before the generic 503 mapper."""
    from extproc.envoy.local_replies import local_reply_config

    mappers = local_reply_config(30)["mappers"]
    (uh,) = [m for m in mappers if m["filter"].get("response_flag_filter") == {"flags": ["UH"]}]
    error = uh["body_format_override"]["json_format"]["error"]
    assert (error["code"], error["type"]) == ("provider_address_unknown", "server_error")
    assert "%REQ(:AUTHORITY)%" in error["message"]
    generic_503 = next(i for i, m in enumerate(mappers) if "status_code_filter" in m["filter"]
                       and m["filter"]["status_code_filter"]["comparison"]["value"]["default_value"] == 503)
    assert mappers.index(uh) < generic_503
