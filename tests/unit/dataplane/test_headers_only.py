"""Issue 32's experiment, the ext_proc's side (`extproc.dataplane.headers_only`): with the switch on,
a request is answered at its headers with what Envoy's write filter puts into the body; one its
route or endpoint would need the body for, or whose body Envoy could not parse, is refused."""

from __future__ import annotations

import pytest
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format

from extproc.dataplane.headers_only import UNSUPPORTED_CODE, headers_only_path
from extproc.dataplane.processor import ExternalProcessor
from extproc.envoy.body_transform import BODY_MODEL_HEADER, BODY_READ_HEADER, BODY_STREAM_HEADER
from extproc.policy.table import TableHolder
from extproc.protocol import CLUSTER_HEADER, METADATA_NAMESPACE
from support.ext_proc_messages import DASH_CLUSTER, error_of, headers_msg, set_headers
from support.manifests import DASHSCOPE, MOONSHOT, load_seed


@pytest.fixture(scope="module")
def seed_table():
    return load_seed("01-LLMProvider.yaml", "04-LLMProvider-moonshot.yaml").table


READ = {BODY_READ_HEADER: "1", BODY_MODEL_HEADER: "client-model"}


def answer(table, authority: str, extra: dict[str, str], path: str = "/v1/chat/completions") -> pb.ProcessingResponse:
    exchange = ExternalProcessor(TableHolder(table), draw=lambda: 0.0, headers_only=True).exchange()
    message = headers_msg(authority, extra=extra)
    for h in message.request_headers.headers.headers:
        if h.key == ":path":
            h.raw_value = path.encode()
    answers, done = exchange.on_message(message.SerializeToString())
    assert done and len(answers) == 1  # the whole answer, at the headers: no body comes
    return pb.ProcessingResponse.FromString(answers[0])


def metadata(response: pb.ProcessingResponse) -> dict:
    return json_format.MessageToDict(response.dynamic_metadata)[METADATA_NAMESPACE]


@pytest.mark.parametrize("stream_header, stream, options", [
    pytest.param(None, False, None, id="no-stream-in-the-body"),
    pytest.param("false", False, None, id="stream-false"),
    pytest.param("true", True, {"include_usage": True}, id="stream-true-usage-asked-for"),
])
def test_answered_at_the_headers_with_the_configs_model(seed_table, stream_header, stream, options):
    extra = {**READ, **({BODY_STREAM_HEADER: stream_header} if stream_header else {})}
    response = answer(seed_table, DASHSCOPE, extra)
    assert response.WhichOneof("response") == "request_headers"
    headers = set_headers(response)
    assert headers[CLUSTER_HEADER] == DASH_CLUSTER and "content-length" not in headers
    removed = set(response.request_headers.response.header_mutation.remove_headers)
    assert {BODY_READ_HEADER, BODY_MODEL_HEADER} <= removed  # never sent on to the provider
    values = metadata(response)
    assert values["request_model"] == "qwen1.5-72b-chat"  # the config's, never the client's
    assert values["stream"] is stream
    assert values.get("stream_options") == options


@pytest.mark.parametrize("authority, extra, path, status, code", [
    pytest.param(DASHSCOPE, {BODY_MODEL_HEADER: "x"}, "/v1/chat/completions", 400, "invalid_json",
                 id="envoy-could-not-parse-the-body"),
    pytest.param(DASHSCOPE, {**READ, BODY_STREAM_HEADER: "yes"}, "/v1/chat/completions", 400, "invalid_stream",
                 id="stream-not-a-boolean"),
    pytest.param(MOONSHOT, READ, "/v1/chat/completions", 500, UNSUPPORTED_CODE, id="route-forces-stream"),
    pytest.param(DASHSCOPE, READ, "/v1/embeddings", 500, UNSUPPORTED_CODE, id="not-chat"),
])
def test_refused_rather_than_forwarded_unchecked(seed_table, authority, extra, path, status, code):
    got_status, body, _, _ = error_of(answer(seed_table, authority, extra, path))
    assert (got_status, body["error"]["code"]) == (status, code)


def test_the_switch_is_off_unless_set_true():
    assert not headers_only_path({})
    assert not headers_only_path({"LLM_GATEWAY_HEADERS_ONLY_PATH": "1"})
    assert headers_only_path({"LLM_GATEWAY_HEADERS_ONLY_PATH": " True "})
