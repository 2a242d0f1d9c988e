"""The floor contender: the ext_proc design's floor. Its server is the same lean HTTP/2 server as
the gateway's (`extproc.dataplane.grpc_h2`) answering every request with a prebuilt response (no
parsing, routing or rewrite) and taking the access log without reading it; its Envoy runs the
gateway's own bootstrap (the same filters, access logs and limits) with static provider clusters.
What remains is what any processor costs in this design.

Experiment knobs for the floor's bootstrap (attributing a cost; not for the headline figures):
BENCH_FLOOR_DROP=name,... drops filters by name (`accesslog` drops the access logs);
BENCH_FLOOR_GOOGLE_GRPC=1 gives its ext_proc filter Envoy's google_grpc client.
"""

from __future__ import annotations

import asyncio
import os

from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.protocol import CLUSTER_HEADER, CONTROL_CLUSTER, HEALTH_CHECK, PROCESS, STREAM_ACCESS_LOGS


def floor_server(host: str, port: int, cluster: str, provider_host: str, path: str, key: str) -> None:
    """An ext_proc that answers every request with one prebuilt response: the request's own body,
    the headers routing needs. What remains is the design's cost: Envoy's side of the call, the
    lean server's framing, the event loop. Runs until killed."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.grpc_h2 import serve
    from extproc.dataplane.health_check import HealthCheck

    def header(k: str, v: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                          append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)

    headers_answer = pb.ProcessingResponse()
    common = headers_answer.request_headers.response
    # the same header changes as the gateway's but the host: the bench's clients already name the
    # provider host, and the floor's Envoy routes by it (the floor serves two providers, reading nothing)
    common.header_mutation.set_headers.extend([header(":path", path), header(CLUSTER_HEADER, cluster),
                                               header("authorization", f"Bearer {key}")])
    common.clear_route_cache = True
    headers_bytes = headers_answer.SerializeToString()
    body_bytes = pb.ProcessingResponse(request_body=pb.BodyResponse()).SerializeToString()

    class Prebuilt:
        """Headers, then the body in chunks (Envoy may send an empty last one): every message is
        answered at once when the body is whole, as the gateway's ext_proc does."""
        __slots__ = ("chunks",)

        def __init__(self) -> None:
            self.chunks = 0

        def on_message(self, message: bytes):
            request = pb.ProcessingRequest.FromString(message)
            if request.HasField("request_headers"):
                return None, False
            self.chunks += 1
            if request.request_body.end_of_stream:
                return [headers_bytes, *([body_bytes] * self.chunks)], True
            return None, False

    class Drop:
        def on_message(self, message: bytes):
            return None, False

        def on_client_end(self) -> bytes:
            return b""

    methods = {PROCESS: lambda identity: Prebuilt(),
               STREAM_ACCESS_LOGS: lambda identity: Drop(),
               HEALTH_CHECK: lambda identity: HealthCheck(lambda: True)}  # Envoy health-checks a TCP ext_proc

    async def main() -> None:
        server = await serve(host, port, methods, 16 << 20)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def floor_bootstrap(listen: int, admin: int, floor_port: int, provider_clusters: dict[str, dict],
                    access_log: str) -> dict:
    """The gateway's own bootstrap (the same filters, access logs and limits), its ext_proc being
    the floor server, the provider clusters static and chosen by host (the floor reads nothing)."""
    boot = bootstrap(BootstrapOptions(listen=HostPort("127.0.0.1", listen), admin=HostPort("127.0.0.1", admin),
                                      ext_proc=HostPort("127.0.0.1", floor_port), access_log=access_log))
    del boot["dynamic_resources"]
    statics = boot["static_resources"]
    statics["clusters"] = [*(c for c in statics["clusters"] if c["name"] != CONTROL_CLUSTER),
                           *provider_clusters.values()]
    hcm = statics["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    drop = os.environ.get("BENCH_FLOOR_DROP", "").split(",")
    hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in drop]
    if "accesslog" in drop:
        hcm["access_log"] = []
    if os.environ.get("BENCH_FLOOR_GOOGLE_GRPC"):  # Envoy's google_grpc client instead of envoy_grpc
        for f in hcm["http_filters"]:
            service = f["typed_config"].get("grpc_service")
            if service and "envoy_grpc" in service:
                limit = service["envoy_grpc"].get("max_receive_message_length")
                f["typed_config"]["grpc_service"] = {"google_grpc": {
                    "target_uri": f"127.0.0.1:{floor_port}", "stat_prefix": "floor",
                    **({"per_stream_buffer_limit_bytes": limit} if limit else {})}}
    hcm.pop("rds", None)  # static routes: the floor has no xDS
    hcm["route_config"] = {"name": "floor", "virtual_hosts": [
        {"name": name, "domains": [host], "include_request_attempt_count": True,  # the retry rewrite skips attempt 1
         "routes": [{"match": {"prefix": "/"}, "route": {"cluster": name, "timeout": "300s"}}]}
        for host, name in ((h, c["name"]) for h, c in provider_clusters.items())]}
    return boot


def main(argv: list[str]) -> int:
    """`python -m benchmarks floor-server PORT CLUSTER PROVIDER_HOST PATH KEY`: started by the bench."""
    port, cluster, provider_host, path, key = argv
    floor_server("127.0.0.1", int(port), cluster, provider_host, path, key)
    return 0
