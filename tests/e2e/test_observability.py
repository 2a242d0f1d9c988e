"""Streaming and LLM observability through a real Envoy: events as they come, tokens counted
exactly in /metrics and in the access log, provider errors passed through and counted."""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from extproc.demo.fake_provider import count_tokens
from support.helpers import CHAT, seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
ROUTE = "default/dashscope-route"


@pytest.fixture
def gw(tmp_path, gateway_factory):
    return gateway_factory(seed_dir(tmp_path, "01", "02", "03", "04"))


def stream_request(gw, host: str, headers: dict[str, str] | None = None, content: str = "Hi there"):
    """POST a streamed chat request; returns (status, [(arrival time, raw chunk)], full body)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.listen_port, timeout=30)
    body = json.dumps({"messages": [{"role": "user", "content": content}], "stream": True})
    conn.request("POST", f"http://{host}/", body=body, headers={"content-type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    chunks = []
    while True:
        data = resp.read1(65536)
        if not data:
            break
        chunks.append((time.time(), data))
    conn.close()
    return resp.status, resp.getheader("content-type"), chunks, b"".join(c for _, c in chunks)


def events(body: bytes) -> list:
    out = []
    for block in body.decode().split("\n\n"):
        if block.startswith("data: "):
            payload = block[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def test_stream_reaches_client_as_provider_sends_it(gw, fresh_providers):
    status, content_type, chunks, body = stream_request(gw, DASHSCOPE, {"x-fake-event-delay": "0.3"})
    assert status == 200 and content_type.startswith("text/event-stream")
    sent = fresh_providers[DASHSCOPE].requests[-1]
    # the client had the first event long before the provider sent its last one
    first_arrival = chunks[0][0]
    assert first_arrival < sent.event_times[-1] - 1.0, (first_arrival, sent.event_times)
    assert len(chunks) >= 5  # not one buffered blob
    got = events(body)
    assert got[-1] == "[DONE]"
    assert got[0]["model"] == "qwen1.5-72b-chat"
    # the gateway asked for usage on the client's behalf: the client sees the usage event too
    assert sent.body["stream_options"] == {"include_usage": True}
    assert got[-2]["usage"]["completion_tokens"] == count_tokens("Hello! I am qwen1.5-72b-chat, served by dashscope.")
    assert "accept-encoding" not in sent.headers  # so usage can be read: the answer comes uncompressed


def test_exact_token_counts_in_metrics_and_access_log(gw, fresh_providers):
    replies = ["one two three", "four five", "six seven eight nine ten"]
    prompt = "alpha beta gamma delta"  # 4 tokens for the fake's tokenizer
    expected_in = expected_out = 0
    for reply in replies:  # plain JSON answers
        resp = gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": prompt}]}, {"x-fake-reply": reply})
        assert resp.status == 200
        expected_in, expected_out = expected_in + 4, expected_out + count_tokens(reply)
    for headers in ({"x-fake-reply": "a b c d e f"}, {"x-fake-reply": "g h i", "x-fake-split": "1"}):  # streamed
        status, _, chunks, body = stream_request(gw, DASHSCOPE, headers, content=prompt)
        assert status == 200 and events(body)[-1] == "[DONE]"
        expected_in, expected_out = expected_in + 4, expected_out + count_tokens(headers["x-fake-reply"])
    streamed_split = fresh_providers[DASHSCOPE].requests[-1]
    assert len(streamed_split.event_times) >= 5

    labels = {("gen_ai_provider_name", DASHSCOPE), ("gen_ai_request_model", "qwen1.5-72b-chat"),
              ("gen_ai_response_model", "qwen1.5-72b-chat"), ("llm_route", ROUTE), ("llm_rule", "rules[1]"),
              ("llm_provider", "default/dashscope-qwen"), ("gen_ai_operation_name", "chat")}

    def sample(name: str, **extra) -> float | None:
        return gw.metrics().get((name, frozenset(labels | set(extra.items()))))

    wait_until(lambda: sample("llm_gateway_requests_total", outcome="success", error_type="") == 5, 10,
               lambda: str(gw.metrics()))
    assert sample("gen_ai_client_token_usage_sum", gen_ai_token_type="input") == expected_in
    assert sample("gen_ai_client_token_usage_sum", gen_ai_token_type="output") == expected_out
    assert sample("gen_ai_client_token_usage_count", gen_ai_token_type="output") == 5
    assert sample("gen_ai_server_request_duration_seconds_count", error_type="") == 5
    assert sample("gen_ai_server_time_to_first_token_seconds_count") == 2  # the streamed ones
    assert sample("gen_ai_server_time_per_output_token_seconds_count") == 2

    wait_until(lambda: len(gw.access_entries()) >= 5, 10)
    entries = gw.access_entries()
    assert [e["stream"] for e in entries] == [False, False, False, True, True]
    assert sum(e["prompt_tokens"] for e in entries) == expected_in
    assert sum(e["completion_tokens"] for e in entries) == expected_out
    for e in entries:
        assert e["route"] == ROUTE and e["rule"] == "rules[1]" and e["provider"] == "default/dashscope-qwen"
        assert e["request_model"] == e["response_model"] == "qwen1.5-72b-chat"
        assert e["status"] == 200 and e["host"] == DASHSCOPE
        assert e["total_tokens"] == e["prompt_tokens"] + e["completion_tokens"]
        assert e["upstream_cluster"] == "llm_provider_dashscope_aliyuncs_com"
    assert entries[3]["ttft_ms"] > 0 and entries[0]["ttft_ms"] is None


@pytest.mark.parametrize("status", [429, 500])
def test_provider_errors_pass_through_and_are_counted(gw, fresh_providers, status):
    resp = gw.request(MOONSHOT, CHAT, {"x-fake-status": str(status)})
    assert resp.status == status
    assert resp.json() == {"error": {"message": f"fake provider answered {status} as asked",
                                     "type": "rate_limit_error" if status == 429 else "server_error",
                                     "code": "fake_error"}}
    key = ("llm_gateway_requests_total", frozenset({
        ("gen_ai_operation_name", "chat"), ("gen_ai_provider_name", MOONSHOT),
        ("gen_ai_request_model", "moonshot-v1-8k"), ("gen_ai_response_model", ""),
        ("llm_route", "default/moonshot"), ("llm_rule", "default"),
        ("llm_provider", "default/moonshot"), ("outcome", "provider_error"), ("error_type", str(status))}))
    wait_until(lambda: gw.metrics().get(key) == 1, 10, lambda: str(gw.metrics()))
    wait_until(lambda: gw.access_entries(), 10)
    (entry,) = gw.access_entries()
    assert entry["status"] == status and entry["details"] == "via_upstream"


def test_error_event_mid_stream_passes_through_and_is_counted(gw):
    status, _, _, body = stream_request(gw, DASHSCOPE, {"x-fake-stream-error": "1"})
    assert status == 200
    assert events(body)[1] == {"error": {"message": "the model failed mid-stream", "type": "server_error",
                                         "code": None}}
    wait_until(lambda: any(k[0] == "llm_gateway_requests_total" and ("error_type", "server_error") in k[1]
                           and ("outcome", "provider_error") in k[1] for k in gw.metrics()),
               10, lambda: str(gw.metrics()))
    wait_until(lambda: gw.access_entries(), 10)
    assert gw.access_entries()[0]["stream_error"] == "server_error"


def test_gateway_rejections_are_counted_by_reason(gw):
    assert gw.request("unknown.example.com", CHAT).status == 404
    assert gw.request(DASHSCOPE, b"not json").status == 400
    rejected = lambda m: {dict(k[1])["error_type"]: v for k, v in m.items()  # noqa: E731
                          if k[0] == "llm_gateway_requests_total" and ("outcome", "rejected") in k[1]}
    wait_until(lambda: rejected(gw.metrics()) == {"unknown_host": 1, "invalid_json": 1}, 10, lambda: str(gw.metrics()))


def hang_up(gw, headers: dict[str, str], stream: bool, after_first_byte: bool) -> bytes:
    """Send a chat request on a raw connection and close it mid-answer: once the answer's headers
    (and for a stream, its first event) arrived, or while the provider is still thinking."""
    body = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "stream": stream}).encode()
    head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock = socket.create_connection(("127.0.0.1", gw.listen_port), timeout=10)
    sock.sendall(f"POST / HTTP/1.1\r\nhost: {DASHSCOPE}\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\n{head}\r\n".encode() + body)
    got = b""
    if after_first_byte:
        while (b"data: " if stream else b"\r\n\r\n") not in got:
            data = sock.recv(65536)
            assert data, got
            got += data
    else:
        time.sleep(0.5)  # the request is with the provider, which answers after 3 s
    sock.close()
    return got


def test_client_hanging_up_is_client_cancelled(gw, fresh_providers):
    """A user closing the tab mid-answer is counted as client_cancelled, never as the gateway
    failing: streamed answers before and after the first event reached the client, JSON answers
    before the first byte. A JSON answer reaches the client whole (Envoy holds its headers until
    json_to_metadata has read the body), so a client that saw its first byte had all of it."""
    before = {"x-fake-delay": "3"}
    assert b"data: " in hang_up(gw, {"x-fake-event-delay": "0.5"}, stream=True, after_first_byte=True)
    hang_up(gw, before, stream=True, after_first_byte=False)
    hang_up(gw, before, stream=False, after_first_byte=False)

    def outcomes() -> dict[tuple[str, str, str], float]:
        return {(dict(k[1])["outcome"], dict(k[1])["error_type"], dict(k[1])["gen_ai_response_model"]): v
                for k, v in gw.metrics().items() if k[0] == "llm_gateway_requests_total"}

    wait_until(lambda: sum(outcomes().values()) == 3, 15, lambda: str(outcomes()))
    assert outcomes() == {
        ("client_cancelled", "downstream_remote_disconnect", "qwen1.5-72b-chat"): 1,  # the stream's first event said
        ("client_cancelled", "downstream_remote_disconnect", ""): 2,
    }, outcomes()

    answer = hang_up(gw, {"x-fake-body-delay": "0.3"}, stream=False, after_first_byte=True)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length")))
    assert len(body) == length and json.loads(body)["usage"]["completion_tokens"] > 0  # whole, with the first byte
    wait_until(lambda: outcomes().get(("success", "", "qwen1.5-72b-chat")) == 1, 15, lambda: str(outcomes()))
    wait_until(lambda: len(gw.access_entries()) == 4, 10)
    entries = gw.access_entries()
    assert all(e["route"] == ROUTE for e in entries)
    assert sorted((e["details"], e["flags"]) for e in entries) == [
        ("downstream_remote_disconnect", "DC")] * 3 + [("via_upstream", "-")]


def rss_kib(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_ext_proc_streams_all_closed_and_memory_flat(gw):
    """Every ext_proc stream Envoy opens is closed again, whatever the client does (answers read
    whole, streams, clients gone), and the ext_proc's memory stays flat over many requests."""
    def round_of_requests(n: int) -> None:
        for i in range(n):
            if i % 10 == 0:
                hang_up(gw, {"x-fake-event-delay": "0.2"}, stream=True, after_first_byte=True)
            elif i % 2:
                status, _, _, _ = stream_request(gw, DASHSCOPE)
                assert status == 200
            else:
                assert gw.request(DASHSCOPE, CHAT).status == 200

    round_of_requests(60)  # warm: connections, caches, allocator arenas
    start = rss_kib(gw.process.pid)
    round_of_requests(240)

    def stat(name: str) -> int:
        for line in gw.admin("/stats").splitlines():
            key, _, value = line.partition(": ")
            if key == name:
                return int(value)
        raise AssertionError(f"no stat {name}")

    prefix = "http.llm_gateway.ext_proc.request."
    # no ext_proc stream stays open; the access log has its stream on a cluster of its own
    wait_until(lambda: stat("cluster.llm_gateway_ext_proc.upstream_rq_active") == 0, 15, lambda: gw.admin("/stats"))
    assert stat("cluster.llm_gateway_ext_proc.upstream_rq_total") == 300
    assert stat("cluster.llm_gateway_access_log.upstream_rq_active") == 1
    assert stat(prefix + "streams_started") == 300 == stat(prefix + "streams_closed") + stat(prefix + "streams_failed")
    assert stat(prefix + "streams_failed") == 0
    grown = rss_kib(gw.process.pid) - start
    assert grown < 4096, f"the ext_proc grew by {grown} KiB over 240 requests"
