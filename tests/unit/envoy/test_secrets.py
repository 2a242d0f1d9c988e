"""Envoy's side of mutual TLS between the sidecars and an egress gateway: the TLS contexts (valid
Envoy API, the right secrets and peer names), and the SDS stream: secrets for the stream's
verified caller, Envoy's answers not answered again, a certificate pushed again when due, a
caller whose credentials no longer hold cut off."""

from __future__ import annotations

import asyncio
import json
import subprocess

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2, tls_pb2
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import json_format

import support.envoy_api  # noqa: F401  (registers every @type)
from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import BootstrapOptions, GatewayListenerTls, bootstrap, token_sds
from extproc.envoy.secrets import (
    SECRET_TYPE_URL,
    SecretDiscovery,
    certificate_secret,
    downstream_mtls,
    trust_bundle_secret,
    upstream_mtls,
)
from extproc.ops.up import envoy_binary
from extproc.policy.caller import Caller
from extproc.protocol import (
    CERTIFICATES_CLUSTER,
    CONTROL_CLUSTER,
    PEER_SUBJECT_ATTRIBUTE,
    PEER_URI_ATTRIBUTE,
    TRUST_BUNDLE_SECRET,
    WORKLOAD_SECRET,
)
from support.envoy_api import ext_proc

GATEWAY_ID = "spiffe://cluster.local/ns/llm-gateway/sa/egress"


def test_a_sidecars_transport_socket_to_a_gateway():
    cluster = json_format.ParseDict({"name": "c", "transport_socket": upstream_mtls(GATEWAY_ID, CONTROL_CLUSTER)},
                                    cluster_pb2.Cluster())
    ctx = tls_pb2.UpstreamTlsContext()
    assert cluster.transport_socket.typed_config.Unpack(ctx)
    common = ctx.common_tls_context
    (own,) = common.tls_certificate_sds_secret_configs
    assert own.name == WORKLOAD_SECRET
    assert own.sds_config.api_config_source.grpc_services[0].envoy_grpc.cluster_name == CONTROL_CLUSTER
    combined = common.combined_validation_context
    assert combined.validation_context_sds_secret_config.name == TRUST_BUNDLE_SECRET
    (san,) = combined.default_validation_context.match_typed_subject_alt_names
    assert (san.san_type, san.matcher.exact) == (san.URI, GATEWAY_ID)  # only the gateway's identity
    assert common.tls_params.tls_minimum_protocol_version == common.tls_params.TLSv1_3


def test_a_gateways_listener_requires_a_mesh_certificate():
    ctx = tls_pb2.DownstreamTlsContext()
    listener = json_format.ParseDict({"name": "l", "filter_chains": [
        {"transport_socket": downstream_mtls(GATEWAY_ID, CERTIFICATES_CLUSTER)}]}, listener_pb2.Listener())
    assert listener.filter_chains[0].transport_socket.typed_config.Unpack(ctx)
    assert ctx.require_client_certificate.value is True
    (own,) = ctx.common_tls_context.tls_certificate_sds_secret_configs
    assert own.name == GATEWAY_ID
    assert own.sds_config.initial_fetch_timeout.ToSeconds() == 0  # never a listener without its certificate
    (san,) = ctx.common_tls_context.combined_validation_context.default_validation_context.match_typed_subject_alt_names
    assert san.matcher.prefix == "spiffe://cluster.local/"


def test_the_gateways_bootstrap(tmp_path):
    (tmp_path / "token").write_text("t" * 40)
    (tmp_path / "sds.json").write_text(json.dumps(token_sds(str(tmp_path / "token"))))
    tls = GatewayListenerTls(GATEWAY_ID, HostPort("llm-gateway-control.llm-gateway.svc", 18000),
                             str(tmp_path / "sds.json"))
    boot = bootstrap(BootstrapOptions(socket_dir="/run/gw", gateway_tls=tls))
    listener = boot["static_resources"]["listeners"][0]
    assert listener["filter_chains"][0]["transport_socket"] == downstream_mtls(GATEWAY_ID, CERTIFICATES_CLUSTER)
    # the connection's client certificate to the ext_proc with each request: Envoy's attributes, never a header
    assert ext_proc(boot)["request_attributes"] == [PEER_URI_ATTRIBUTE, PEER_SUBJECT_ATTRIBUTE]
    clusters = {c["name"]: c for c in boot["static_resources"]["clusters"]}
    source = clusters[CERTIFICATES_CLUSTER]
    address = source["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (source["type"], address["port_value"]) == ("STRICT_DNS", 18000)
    options = source["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    injector = options["http_filters"][0]["typed_config"]["credential"]["typed_config"]
    assert injector["credential"]["sds_config"]["path_config_source"]["path"] == tls.token_sds
    # without: no TLS, no attributes, no such cluster (nothing done per request)
    plain = bootstrap(BootstrapOptions(socket_dir="/run/gw"))
    assert "transport_socket" not in plain["static_resources"]["listeners"][0]["filter_chains"][0]
    assert "request_attributes" not in ext_proc(plain)
    assert CERTIFICATES_CLUSTER not in {c["name"] for c in plain["static_resources"]["clusters"]}
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(boot))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


class Aborted(Exception):
    pass


class FakeContext:
    def __init__(self):
        self.sent: list[discovery_pb2.DiscoveryResponse] = []
        self.written = asyncio.Event()
        self.aborted: tuple | None = None

    async def write(self, response):
        self.sent.append(response)
        self.written.set()

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise Aborted(details)


def request(*names: str, nonce: str = "") -> discovery_pb2.DiscoveryRequest:
    return discovery_pb2.DiscoveryRequest(resource_names=list(names), response_nonce=nonce, type_url=SECRET_TYPE_URL)


def names_of(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    out = []
    for packed in response.resources:
        secret = secret_pb2.Secret()
        assert packed.Unpack(secret)
        out.append(secret.name)
    return out


CALLER = Caller("shop", "payments", "p-1", uid="u-1")


def test_an_sds_stream():
    async def run():
        clock = [100.0]
        issued: list[str] = []
        valid = [True]

        async def identify(_context):
            return (CALLER, False) if valid[0] else None

        def secret_for(name, caller, operator):
            assert (caller, operator) == (CALLER, False)
            if name == TRUST_BUNDLE_SECRET:
                return trust_bundle_secret(b"ca"), float("inf")
            if name != WORKLOAD_SECRET:
                return None
            issued.append(name)
            return certificate_secret(name, b"cert", b"key"), clock[0] + 0.2

        requests: asyncio.Queue = asyncio.Queue()

        async def iterator():
            while (item := await requests.get()) is not None:
                yield item

        context = FakeContext()
        sds = SecretDiscovery(identify, secret_for, clock=lambda: clock[0])
        stream = asyncio.ensure_future(sds.StreamSecrets(iterator(), context))

        async def next_response():
            await asyncio.wait_for(context.written.wait(), 5)
            context.written.clear()
            return context.sent[-1]

        await requests.put(request(WORKLOAD_SECRET, TRUST_BUNDLE_SECRET, "spiffe://cluster.local/ns/shop/sa/web"))
        first = await next_response()
        assert names_of(first) == [WORKLOAD_SECRET, TRUST_BUNDLE_SECRET]  # not another workload's
        assert (first.version_info, first.nonce, first.type_url) == ("1", "1", SECRET_TYPE_URL)
        # Envoy's ACK of it is not answered again
        await requests.put(request(WORKLOAD_SECRET, TRUST_BUNDLE_SECRET, "spiffe://cluster.local/ns/shop/sa/web",
                                   nonce="1"))
        await asyncio.sleep(0.05)
        assert len(context.sent) == 1
        # when its certificate is due, it is sent again on the same stream
        clock[0] += 0.2
        renewed = await next_response()
        assert renewed.version_info == "2" and names_of(renewed) == [WORKLOAD_SECRET, TRUST_BUNDLE_SECRET]
        assert issued == [WORKLOAD_SECRET, WORKLOAD_SECRET]
        # a caller whose credentials no longer hold is cut off at the next renewal
        valid[0] = False
        clock[0] += 0.2
        with pytest.raises(Aborted):
            await asyncio.wait_for(stream, 5)
        assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(run())


def test_an_sds_stream_of_an_unverified_caller_gets_nothing():
    async def run():
        async def identify(_context):
            return None

        async def iterator():
            yield request(WORKLOAD_SECRET)

        context = FakeContext()
        with pytest.raises(Aborted):
            await SecretDiscovery(identify, lambda *a: pytest.fail("asked")).StreamSecrets(iterator(), context)
        assert context.aborted[0] == grpc.StatusCode.UNAUTHENTICATED and not context.sent

    asyncio.run(run())
