"""The headers-only floor (issue 32): the floor of the path where the ext_proc decides from the
request headers alone and Envoy's transform filter writes the decision into the body
(`extproc.envoy.body_transform`). Beside the floor (benchmarks/floor.py: the ext_proc receives
the body and sends it back) it shows what the headers-only design costs at best, and that the
ext_proc's memory per request no longer depends on the body's size.

Its server is the same lean HTTP/2 server answering the request headers at once with a prebuilt
response: the routing headers and the decision's metadata (`request_model`, and `stream_options`
where Envoy read `stream: true` out of the body), nothing per request but that one header's look-up.
Its Envoy runs the floor's bootstrap with the ext_proc in the headers-only mode and the path's
filters around it.
"""

from __future__ import annotations

import asyncio

from extproc.envoy.body_transform import BODY_READ_HEADER, BODY_STREAM_HEADER, STREAM_OPTIONS_KEY, headers_only_filters
from extproc.protocol import CLUSTER_HEADER, HEALTH_CHECK, METADATA_NAMESPACE, PROCESS, STREAM_ACCESS_LOGS

from .floor import floor_bootstrap

MODEL = "qwen-turbo"  # the model the floor's decision names (the seed's first provider's)


def headers_floor_server(host: str, port: int, cluster: str, path: str, key: str, trusting: bool = False) -> None:
    """An ext_proc answering every request's headers at once (the body never comes). Runs until
    killed. `trusting`: a request without the marker of a parsed body is answered all the same
    (a floor without the read filter, for attributing its cost)."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
    from google.protobuf import struct_pb2

    from extproc.dataplane.grpc_h2 import serve
    from extproc.dataplane.health_check import HealthCheck

    def header(k: str, v: str) -> base_pb2.HeaderValueOption:
        return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=k, raw_value=v.encode()),
                                          append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD)

    def answer(stream: bool) -> bytes:
        response = pb.ProcessingResponse()
        common = response.request_headers.response
        common.header_mutation.set_headers.extend([header(":path", path), header(CLUSTER_HEADER, cluster),
                                                   header("authorization", f"Bearer {key}")])
        common.clear_route_cache = True
        entries = struct_pb2.Struct()
        entries.update({"request_model": MODEL, "stream": stream,
                        **({STREAM_OPTIONS_KEY: {"include_usage": True}} if stream else {})})
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.CopyFrom(entries)
        return response.SerializeToString()

    plain, streamed = answer(False), answer(True)
    refused = pb.ProcessingResponse()
    refused.immediate_response.status.code = 400  # type: ignore[assignment]
    refused.immediate_response.body = b'{"error":{"message":"request body is not valid JSON","code":"invalid_json"}}'
    refused_bytes = refused.SerializeToString()
    stream_key, read_key = BODY_STREAM_HEADER, BODY_READ_HEADER

    class HeadersOnly:
        __slots__ = ()

        def on_message(self, message: bytes):
            request = pb.ProcessingRequest.FromString(message)
            raw = {h.key: h.raw_value for h in request.request_headers.headers.headers}
            if read_key not in raw and not trusting:  # Envoy could not parse the body: refused, never forwarded as sent
                return [refused_bytes], True
            return [streamed if raw.get(stream_key) == b"true" else plain], True

    class Drop:
        def on_message(self, message: bytes):
            return None, False

        def on_client_end(self) -> bytes:
            return b""

    methods = {PROCESS: lambda identity: HeadersOnly(),
               STREAM_ACCESS_LOGS: lambda identity: Drop(),
               HEALTH_CHECK: lambda identity: HealthCheck(lambda: True)}

    async def main() -> None:
        server = await serve(host, port, methods, 16 << 20)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


def headers_floor_bootstrap(listen: int, admin: int, floor_port: int, provider_clusters: dict[str, dict],
                            access_log: str, drop: tuple[str, ...] = ()) -> dict:
    """The floor's bootstrap, its ext_proc in the headers-only mode between the path's filters.
    `drop`: filters left out by name (attributing a cost: `llm_gateway.body_read`,
    `llm_gateway.body_write`, `llm_gateway.body_strip`; a floor without the read filter is
    told so by its marker header, which the bench's client then sends itself)."""
    boot = floor_bootstrap(listen, admin, floor_port, provider_clusters, access_log)
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["http_filters"] = [f for f in headers_only_filters(hcm["http_filters"]) if f["name"] not in drop]
    return boot


def main(argv: list[str]) -> int:
    """`python -m benchmarks headers-floor-server PORT CLUSTER PATH KEY [trusting]`: started by the bench."""
    port, cluster, path, key = argv[:4]
    headers_floor_server("127.0.0.1", int(port), cluster, path, key, argv[4:] == ["trusting"])
    return 0
