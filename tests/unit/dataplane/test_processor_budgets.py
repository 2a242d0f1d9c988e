"""The ext_proc waiting for its budget's Redis round trip, served by the lean HTTP/2 server to a
real gRPC client that sends a request's headers and body at once, as Envoy does: the answers
come together once Redis decided (the body's waited behind the headers'), with the budget's
metadata, or the 429 alone. Two processors on one real Redis are two instances."""

from __future__ import annotations

import asyncio

import grpc
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format
from prometheus_client import CollectorRegistry

from extproc.dataplane import grpc_h2 as h2
from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.budget_gate import BudgetGate
from extproc.policy.table import TableHolder
from extproc.protocol import METADATA_NAMESPACE, PROCESS
from support.budget_docs import budget_doc
from support.ext_proc_messages import CHAT, body_msg, headers_msg
from support.manifests import DASHSCOPE, load_docs, provider


def test_a_request_waiting_for_redis_is_answered_whole_or_refused_on_any_instance(tmp_path, redis_server):
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE),
                         budget_doc([{"name": "everyone", "tokens": 1000, "requests": 1, "per": "1h"}]))
    gates = [BudgetGate(CollectorRegistry(), lambda: compiled.table, redis_url=redis_server.url) for _ in range(2)]
    processors = [ExternalProcessor(TableHolder(compiled.table), budgets=gate) for gate in gates]
    request = [headers_msg(DASHSCOPE, extra={"x-user-id": "kim"}).SerializeToString(),
               body_msg(CHAT).SerializeToString()]

    async def main():
        servers = []
        for gate, processor in zip(gates, processors, strict=True):
            await gate.start()
            servers.append(await h2.serve("127.0.0.1", 0, {PROCESS: processor.exchange}, 1 << 20))
        try:
            answers = []
            for server in (servers[0], servers[0], servers[1]):  # instance 1, again, then instance 2
                port = server.sockets[0].getsockname()[1]
                async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                    stream = channel.stream_stream(PROCESS, request_serializer=lambda b: b,
                                                   response_deserializer=pb.ProcessingResponse.FromString)
                    answers.append([m async for m in stream(iter(request))])
            return answers
        finally:
            for server, gate in zip(servers, gates, strict=True):
                server.close()
                await gate.stop()

    admitted, again, elsewhere = asyncio.run(main())
    # admitted by Redis: the headers' answer (with the budget's metadata) and the body's, together
    assert [a.WhichOneof("response") for a in admitted] == ["request_headers", "request_body"]
    metadata = json_format.MessageToDict(admitted[0].dynamic_metadata)[METADATA_NAMESPACE]
    assert metadata["ratelimit_remaining_requests"] == "0" and metadata["budget_rule"] == "everyone"
    for refused in (again, elsewhere):  # the second request, on either instance: 429 alone, at once
        assert len(refused) == 1 and refused[0].immediate_response.status.code == 429
        sent = {h.header.key: h.header.raw_value.decode()
                for h in refused[0].immediate_response.headers.set_headers}
        assert int(sent["retry-after"]) > 0 and sent["x-ratelimit-remaining-requests"] == "0"
