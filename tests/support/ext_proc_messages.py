"""The ext_proc driven directly: ProcessingRequest messages built as Envoy sends them, one stream
run through an ExternalProcessor in wire form, and its answers read back."""

from __future__ import annotations

import json
from typing import NamedTuple

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.table import TableHolder

DASH_CLUSTER = "llm_provider_dashscope_aliyuncs_com"
MOON_CLUSTER = "llm_provider_api_moonshot_cn"
CHAT = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hello"}], "temperature": 0.3}


def headers_msg(authority: str, method: str = "POST", extra: dict[str, str] | None = None,
                end_of_stream: bool = False) -> pb.ProcessingRequest:
    pairs = {":method": method, ":path": "/v1/chat/completions", ":scheme": "http", ":authority": authority,
             "content-type": "application/json", **(extra or {})}
    values = [base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()]
    return pb.ProcessingRequest(request_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=values), end_of_stream=end_of_stream))


def body_msg(body: bytes | dict, end_of_stream: bool = True) -> pb.ProcessingRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=end_of_stream))


def run(processor: ExternalProcessor, *messages, between=None) -> list[pb.ProcessingResponse]:
    """One ext_proc stream, in wire form, until the exchange ends it: every answer, in order."""
    exchange = processor.exchange()
    responses = []
    for i, message in enumerate(messages):
        if i and between is not None:
            between()
        answers, done = exchange.on_message(message.SerializeToString())
        responses.extend(pb.ProcessingResponse.FromString(data) for data in answers)
        if done:
            break
    return responses


def processor(table, draw: float = 0.0) -> ExternalProcessor:
    return ExternalProcessor(TableHolder(table), draw=lambda: draw)


def set_headers(response: pb.ProcessingResponse) -> dict[str, str]:
    mutation = response.request_headers.response.header_mutation
    keys = [o.header.key for o in mutation.set_headers]
    assert len(keys) == len(set(keys)), f"header set twice: {keys}"
    return {o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}


class Forwarded(NamedTuple):
    headers: pb.ProcessingResponse  # the answer to the request headers: mutations, metadata
    body: bytes  # the rewritten body, from the answer to the (last) body chunk

    @property
    def common(self) -> pb.CommonResponse:
        return self.headers.request_headers.response


def forward(table, authority: str, body=CHAT, extra=None, draw: float = 0.0) -> Forwarded:
    """The headers get no answer until the body is whole; then both answers come at once."""
    exchange = processor(table, draw).exchange()
    assert exchange.on_message(headers_msg(authority, extra=extra).SerializeToString()) == ([], False)
    answers, done = exchange.on_message(body_msg(body).SerializeToString())
    responses = [pb.ProcessingResponse.FromString(a) for a in answers]
    assert done and [r.WhichOneof("response") for r in responses] == ["request_headers", "request_body"]
    assert not responses[0].request_headers.response.HasField("body_mutation")
    assert not responses[1].request_body.response.HasField("header_mutation")
    return Forwarded(responses[0], responses[1].request_body.response.body_mutation.body)


def error_of(response: pb.ProcessingResponse) -> tuple[int, dict, dict[str, str], str]:
    assert response.WhichOneof("response") == "immediate_response"
    imm = response.immediate_response
    headers = {o.header.key: o.header.raw_value.decode() for o in imm.headers.set_headers}
    return imm.status.code, json.loads(imm.body), headers, imm.details
