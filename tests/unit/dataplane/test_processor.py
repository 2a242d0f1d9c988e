"""The ext_proc service, driven directly: ProcessingRequest messages in, ProcessingResponse messages out.
Routing, rewriting and refusing a request, what a namespace may use, and the hosts a sidecar leaves to
an egress gateway."""

from __future__ import annotations

import json

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.caller import LOCAL, Caller
from extproc.policy.table import EMPTY_TABLE, TableHolder
from extproc.protocol import CLUSTER_HEADER
from support.ext_proc_messages import (
    CHAT,
    DASH_CLUSTER,
    MOON_CLUSTER,
    body_msg,
    error_of,
    forward,
    headers_msg,
    processor,
    run,
    set_headers,
)
from support.gateway_docs import EGRESS, KEY_A, KEY_B, MESH_VIEW, A, B, compiled, providers
from support.manifests import (
    DASHSCOPE,
    DASHSCOPE_KEY,
    HOME,
    MOONSHOT,
    MOONSHOT_KEY,
    compile_in_namespaces,
    load_docs,
    load_seed,
    provider,
    route,
    rule,
)


@pytest.fixture(scope="module")
def seed_table():
    return load_seed("01-LLMProvider.yaml", "02-LLMRoute.yaml", "03-LLMProvider-with-route-config.yaml",
                     "04-LLMProvider-moonshot.yaml", "06-LLMRoute-weighted.yaml").table


@pytest.mark.parametrize(("authority", "extra", "draw", "expected"), [
    pytest.param(DASHSCOPE, {}, 0.0,
                 dict(path="/compatible-mode/v1/chat/completions", host=DASHSCOPE, key=DASHSCOPE_KEY,
                      cluster=DASH_CLUSTER, model="qwen1.5-72b-chat", stream=None), id="dashscope-default-rule"),
    pytest.param(DASHSCOPE, {"user-type": "subscriber"}, 0.0,
                 dict(path="/compatible-mode/v1/chat/completions", host=DASHSCOPE, key=DASHSCOPE_KEY,
                      cluster=DASH_CLUSTER, model="qwen-turbo", stream=None), id="dashscope-subscriber"),
    pytest.param(f"{MOONSHOT}:443", {}, 0.0,
                 dict(path="/v1/chat/completions", host=MOONSHOT, key=MOONSHOT_KEY, cluster=MOON_CLUSTER,
                      model="moonshot-v1-8k", stream=False), id="moonshot-with-port"),
    pytest.param("demo-llm-server", {}, 0.25,
                 dict(path="/compatible-mode/v1/chat/completions", host=DASHSCOPE, key=DASHSCOPE_KEY,
                      cluster=DASH_CLUSTER, model="qwen1.5-72b-chat", stream=None), id="weighted-low-draw"),
    pytest.param("demo-llm-server.default.svc.cluster.local", {}, 0.75,
                 dict(path="/v1/chat/completions", host=MOONSHOT, key=MOONSHOT_KEY, cluster=MOON_CLUSTER,
                      model="moonshot-v1-8k", stream=False), id="weighted-high-draw-cluster-local"),
    pytest.param(DASHSCOPE, {CLUSTER_HEADER: MOON_CLUSTER}, 0.0,
                 dict(path="/compatible-mode/v1/chat/completions", host=DASHSCOPE, key=DASHSCOPE_KEY,
                      cluster=DASH_CLUSTER, model="qwen1.5-72b-chat", stream=None), id="client-cluster-header-ignored"),
    pytest.param(DASHSCOPE, {"authorization": "Bearer sk-client"}, 0.0,
                 dict(path="/compatible-mode/v1/chat/completions", host=DASHSCOPE, key=DASHSCOPE_KEY,
                      cluster=DASH_CLUSTER, model="qwen1.5-72b-chat", stream=None), id="client-authorization-replaced"),
])
def test_headers_then_body_rewrites_and_routes(seed_table, authority, extra, draw, expected):
    response = forward(seed_table, authority, extra=extra, draw=draw)
    common = response.common
    body = response.body
    headers = set_headers(response.headers)
    assert headers[":path"] == expected["path"]
    assert headers[":authority"] == expected["host"]
    assert headers["authorization"] == f"Bearer {expected['key']}"
    assert headers[CLUSTER_HEADER] == expected["cluster"]
    assert headers["content-length"] == str(len(body))
    assert headers["content-type"] == "application/json"
    assert common.clear_route_cache is True
    assert all(o.append_action == base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
               for o in common.header_mutation.set_headers)
    parsed = json.loads(body)
    assert parsed["model"] == expected["model"]
    assert parsed["messages"] == CHAT["messages"] and parsed["temperature"] == CHAT["temperature"]
    assert parsed.get("stream") == expected["stream"]


def test_body_length_header_tracks_the_rewritten_body(seed_table):
    long_model = {**CHAT, "model": "x" * 500}
    response = forward(seed_table, DASHSCOPE, body=long_model)
    assert len(response.body) < len(json.dumps(long_model))
    assert set_headers(response.headers)["content-length"] == str(len(response.body))


def test_same_target_twice_gets_one_content_length_each(seed_table):
    """The per-target header mutation is prebuilt and shared: a request's content-length must not leak into it."""
    small = forward(seed_table, MOONSHOT, body={"messages": [{"role": "user", "content": "a"}]})
    large = forward(seed_table, MOONSHOT, body={"messages": [{"role": "user", "content": "a" * 1000}]})
    for response in (small, large):
        mutation = response.common.header_mutation
        lengths = [o.header.raw_value for o in mutation.set_headers if o.header.key == "content-length"]
        assert lengths == [str(len(response.body)).encode()]


def test_provider_without_api_key_removes_client_authorization(tmp_path):
    table = load_docs(tmp_path, provider("local", "local.example.com", model="m-local")).table
    response = forward(table, "local.example.com", extra={"authorization": "Bearer sk-client"})
    mutation = response.common.header_mutation
    assert "authorization" in mutation.remove_headers
    assert "authorization" not in set_headers(response.headers)


@pytest.mark.parametrize(("messages", "status", "code"), [
    pytest.param([headers_msg("unknown.example.com"), body_msg(CHAT)], 404, "unknown_host", id="unknown-host"),
    pytest.param([headers_msg("dashscope.aliyuncs.com.evil"), body_msg(CHAT)], 404, "unknown_host", id="suffixed-host"),
    pytest.param([headers_msg(DASHSCOPE, method="GET")], 405, "method_not_allowed", id="get"),
    pytest.param([headers_msg(DASHSCOPE, method="PUT"), body_msg(CHAT)], 405, "method_not_allowed", id="put"),
    pytest.param([headers_msg(DASHSCOPE, end_of_stream=True)], 400, "missing_body", id="headers-end-of-stream"),
    pytest.param([headers_msg(DASHSCOPE), body_msg(b"{not json")], 400, "invalid_json", id="body-not-json"),
    pytest.param([headers_msg(DASHSCOPE), body_msg(b"\xff\xfe")], 400, "invalid_json", id="body-invalid-utf8"),
    pytest.param([headers_msg(DASHSCOPE), body_msg(b"[]")], 400, "invalid_body", id="body-array"),
    pytest.param([headers_msg(DASHSCOPE), body_msg({"model": "m", "messages": []})], 400, "invalid_messages",
                 id="body-empty-messages"),
    pytest.param([headers_msg(DASHSCOPE), body_msg(b"")], 400, "invalid_json", id="body-empty"),
    pytest.param([body_msg(CHAT)], 500, "internal_error", id="body-before-headers"),
])
def test_errors_are_immediate_json_responses(seed_table, messages, status, code):
    responses = run(processor(seed_table), *messages)
    got_status, body, headers, details = error_of(responses[-1])
    assert (got_status, body["error"]["code"]) == (status, code)
    assert set(body["error"]) == {"message", "type", "code"} and body["error"]["message"]
    assert body["error"]["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert headers["content-type"] == "application/json"
    assert details == f"llm_gateway_{code}"
    # the error is the stream's only answer: nothing after it is processed, nothing is forwarded
    assert [r.WhichOneof("response") for r in responses] == ["immediate_response"]


def test_stream_stops_after_an_immediate_response(seed_table):
    responses = run(processor(seed_table), headers_msg("unknown.example.com"), body_msg(CHAT), headers_msg(DASHSCOPE))
    assert [r.WhichOneof("response") for r in responses] == ["immediate_response"]


def test_no_matching_rule_is_a_404(tmp_path):
    table = load_docs(tmp_path, provider("p", "backend.example.com"),
                      route("r", "chat.example.com", [rule("backend.example.com",
                                                            matches=[{"headers": {"x-team": {"exact": "a"}}}])])).table
    status, body, _, _ = error_of(run(processor(table), headers_msg("chat.example.com"), body_msg(CHAT))[-1])
    assert (status, body["error"]["code"]) == (404, "no_matching_rule")
    ok = forward(table, "chat.example.com", extra={"x-team": "a"})
    assert set_headers(ok.headers)[":authority"] == "backend.example.com"


def test_request_keeps_the_target_chosen_with_its_headers(seed_table):
    """A config change between the headers and the body does not change (or fail) a request in flight."""
    holder = TableHolder(seed_table)
    proc = ExternalProcessor(holder, draw=lambda: 0.0)
    responses = run(proc, headers_msg(MOONSHOT), body_msg(CHAT),
                    between=lambda: setattr(holder, "table", EMPTY_TABLE))
    assert set_headers(responses[0])[CLUSTER_HEADER] == MOON_CLUSTER
    status, _, _, _ = error_of(run(proc, headers_msg(MOONSHOT), body_msg(CHAT))[-1])
    assert status == 404  # the next request sees the new (empty) table


def test_draw_is_taken_once_per_request(seed_table):
    draws = iter([0.1, 0.9])
    proc = ExternalProcessor(TableHolder(seed_table), draw=lambda: next(draws))
    first = run(proc, headers_msg("demo-llm-server"), body_msg(CHAT))
    second = run(proc, headers_msg("demo-llm-server"), body_msg(CHAT))
    assert set_headers(first[0])[CLUSTER_HEADER] == DASH_CLUSTER
    assert set_headers(second[0])[CLUSTER_HEADER] == MOON_CLUSTER


@pytest.mark.parametrize("phase", ["response_headers", "response_body", "request_trailers", "response_trailers"])
def test_other_phases_are_continued(seed_table, phase):
    request = pb.ProcessingRequest()
    getattr(request, phase).SetInParent()
    responses = run(processor(seed_table), request)
    assert [r.WhichOneof("response") for r in responses] == [phase]


def test_body_in_chunks_is_answered_once_whole(seed_table):
    """Envoy streams the body right behind the headers; nothing is answered until the last chunk,
    then the headers' answer, an emptied answer for each earlier chunk, and the whole rewritten
    body in the answer to the last."""
    raw = json.dumps(CHAT).encode()
    parts = [raw[:7], raw[7:20], raw[20:], b""]
    exchange = processor(seed_table).exchange()
    assert exchange.on_message(headers_msg(DASHSCOPE).SerializeToString()) == ([], False)
    for part in parts[:-1]:
        assert exchange.on_message(body_msg(part, end_of_stream=False).SerializeToString()) == ([], False)
    answers, done = exchange.on_message(body_msg(parts[-1]).SerializeToString())
    responses = [pb.ProcessingResponse.FromString(a) for a in answers]
    assert done
    assert [r.WhichOneof("response") for r in responses] == ["request_headers"] + ["request_body"] * 4
    assert all(r.request_body.response.body_mutation.clear_body for r in responses[1:4])
    body = responses[4].request_body.response.body_mutation.body
    assert json.loads(body) == {**CHAT, "model": "qwen1.5-72b-chat"}
    assert set_headers(responses[0])["content-length"] == str(len(body))


@pytest.mark.parametrize(("sizes", "status"), [
    pytest.param([100, 101], 413, id="over-in-the-second-chunk"),
    pytest.param([201], 413, id="over-in-one-chunk"),
    pytest.param([150, 50], None, id="exactly-at-the-limit"),
])
def test_body_limit_is_enforced_across_chunks(seed_table, sizes, status):
    proc = ExternalProcessor(TableHolder(seed_table), draw=lambda: 0.0, body_limit=200)
    body = json.dumps({"messages": [{"role": "user", "content": ""}]}).encode()
    body = body[:-3] + b" " * (sum(sizes) - len(body)) + body[-3:]  # valid JSON of the exact total size
    chunks, start = [], 0
    for i, size in enumerate(sizes):
        chunks.append(body_msg(body[start:start + size], end_of_stream=i == len(sizes) - 1))
        start += size
    responses = run(proc, headers_msg(DASHSCOPE), *chunks)
    if status is None:
        assert responses[0].WhichOneof("response") == "request_headers"
    else:
        got_status, error, _, _ = error_of(responses[-1])
        assert (got_status, error["error"]["code"]) == (413, "request_too_large")
        assert error["error"]["message"].endswith("its limit is 200 bytes (set with --body-limit)")
        assert len(responses) == 1


def test_sidecar_ext_proc_refuses_a_forwarded_host_and_gives_no_key(tmp_path):
    table = compiled(tmp_path, providers() + [route("r", "chat", [rule(A)], gateways=[EGRESS])], MESH_VIEW).table
    ext_proc = ExternalProcessor(TableHolder(table), draw=lambda: 0.0)
    for host in ("chat", "chat.default.svc:80", A):
        (answer,) = run(ext_proc, headers_msg(host), body_msg(CHAT))
        response = answer.immediate_response
        assert response.status.code == 404
        assert b'"code":"egress_gateway_host"' in response.body and EGRESS.encode() in response.body
        assert KEY_A.encode() not in answer.SerializeToString()
    (unknown,) = run(ext_proc, headers_msg("nothing.example.com"), body_msg(CHAT))
    assert b'"code":"unknown_host"' in unknown.immediate_response.body
    (served,) = run(ext_proc, headers_msg(B), body_msg(CHAT))[:1]  # the mesh's own provider still works
    assert any(h.header.raw_value == f"Bearer {KEY_B}".encode()
               for h in served.request_headers.response.header_mutation.set_headers)


def test_a_namespace_that_may_not_use_a_route_gets_the_unknown_host_answer():
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder

    table = compile_in_namespaces(provider("a", "a.example", namespace="team-a", api_key="sk-team-a"),
                                  provider("shared", "shared.example", namespace=HOME, api_key="sk-shared")).table
    processor = ExternalProcessor(TableHolder(table))

    def ask(identity: Caller, host: str):
        headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode())
                   for k, v in ((":authority", host), (":method", "POST"), (":path", "/"))]
        exchange = processor.exchange(identity)
        out, _ = exchange.on_request(pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers))))
        if not out:
            chat = b'{"messages": [{"role": "user", "content": "hi"}]}'
            out, _ = exchange.on_request(pb.ProcessingRequest(request_body=pb.HttpBody(body=chat, end_of_stream=True)))
        first = out[0]
        if first.HasField("immediate_response"):
            return first.immediate_response.status.code, first.immediate_response.body.replace(host.encode(), b"HOST")
        keys = [h.header.raw_value for h in first.request_headers.response.header_mutation.set_headers
                if h.header.key == "authorization"]
        return 200, keys

    unknown = ask(Caller("team-b", "envoy"), "nobody.example")
    assert unknown[0] == 404
    assert ask(Caller("team-b", "envoy"), "a.example") == unknown  # indistinguishable from an unknown host
    assert ask(Caller("team-a", "envoy"), "a.example") == (200, [b"Bearer sk-team-a"])
    assert ask(Caller("team-b", "envoy"), "shared.example") == (200, [b"Bearer sk-shared"])
    assert ask(LOCAL, "a.example") == (200, [b"Bearer sk-team-a"])


@pytest.mark.parametrize(("draw", "body", "marked", "asked"), [
    pytest.param(0.75, {**CHAT, "stream": True}, True, (True, False), id="moonshot-json-to-a-streaming-client"),
    pytest.param(0.75, {**CHAT, "stream": True, "stream_options": {"include_usage": True}}, True, (True, True),
                 id="moonshot-with-the-usage-asked-for"),
    pytest.param(0.75, CHAT, False, None, id="moonshot-json-to-a-json-client"),
    pytest.param(0.25, {**CHAT, "stream": True}, False, None, id="dashscope-keeps-the-clients-stream"),
    pytest.param(0.25, CHAT, False, None, id="dashscope-keeps-the-clients-json"),
])
def test_only_a_request_a_provider_may_answer_in_another_format_is_marked(seed_table, draw, body, marked, asked):
    """The answer filter runs only where the header is set; the client's ask rides on the metadata."""
    from extproc.protocol import ANSWER_HEADER

    response = forward(seed_table, "demo-llm-server", body=body, draw=draw)
    assert (ANSWER_HEADER in set_headers(response.headers)) is marked
    fields = response.headers.dynamic_metadata.fields["llm_gateway"].struct_value.fields
    if marked:
        assert (fields["client_stream"].bool_value, fields["include_usage"].bool_value) == asked
        assert fields["stream"].bool_value is False  # what the provider is asked for
    else:
        assert "client_stream" not in fields and "include_usage" not in fields


def test_a_client_cannot_mark_its_own_request(seed_table):
    """Only the gateway asks for an answer to be processed: a client's header is removed."""
    from extproc.protocol import ANSWER_HEADER

    response = forward(seed_table, "demo-llm-server", body=CHAT, draw=0.25, extra={ANSWER_HEADER: "1"})
    assert ANSWER_HEADER not in set_headers(response.headers)
    assert ANSWER_HEADER in response.headers.request_headers.response.header_mutation.remove_headers
