"""Every error a client can meet is an OpenAI-style JSON answer with the right status."""

from __future__ import annotations

import http.client
import json
import socket
import subprocess
import sys
import time

import orjson
import pytest

from extproc.demo.fake_provider import FakeProvider
from support.auth_helpers import token_files
from support.helpers import CHAT, free_port, provider_yaml, seed_dir, wait_until

DASHSCOPE = "dashscope.aliyuncs.com"


def assert_json_error(resp, status: int, code: str | None = None) -> dict:
    assert resp.status == status, (resp.status, resp.body)
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "code"}, error
    assert error["message"] and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


@pytest.fixture
def gw(tmp_path, gateway_factory):
    return gateway_factory(seed_dir(tmp_path, "01"), extra=["--body-limit", "1m"])


@pytest.mark.parametrize("body, code", [
    (b"this is not json", "invalid_json"),
    (b"[1, 2, 3]", "invalid_body"),
    (b'"a string"', "invalid_body"),
    (b"\xff\xfe{}", "invalid_json"),
    (b'{"messages": "hello"}', "invalid_messages"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}', "invalid_stream"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "model": 7}', "invalid_model"),
])
def test_bad_bodies_get_400(gw, fresh_providers, body, code):
    assert_json_error(gw.request(DASHSCOPE, body), 400, code)
    assert fresh_providers[DASHSCOPE].requests == []


def body_of_size(size: int) -> bytes:
    """A chat request of exactly `size` bytes."""
    empty = json.dumps({"messages": [{"role": "user", "content": ""}]}).encode()
    return empty[:-4] + b"x" * (size - len(empty)) + empty[-4:]


def test_body_over_limit_gets_413(gw, fresh_providers):
    limit = 1 << 20
    # the ext_proc's 413 (just over) and Envoy's own (past its buffer) both say the limit and the flag
    for size in (limit + 1, 3 * limit):
        error = assert_json_error(gw.request(DASHSCOPE, body_of_size(size)), 413, "request_too_large")
        assert f"its limit is {limit} bytes (set with --body-limit)" in error["message"], error
    assert fresh_providers[DASHSCOPE].requests == []
    # exactly at the limit still goes through, rewritten
    resp = gw.request(DASHSCOPE, body_of_size(limit))
    assert resp.status == 200 and resp.json()["model"] == "qwen1.5-72b-chat"


def test_chunked_body_sent_slowly_is_forwarded_whole(gw, fresh_providers):
    """A body in pieces, with pauses and no content-length, reaches the provider whole and
    rewritten, with the length of the rewritten body."""
    body = json.dumps({"messages": [{"role": "user", "content": "piece " * 5000}], "temperature": 0.2}).encode()

    def pieces():
        for start in range(0, len(body), 7000):
            time.sleep(0.05)
            yield body[start:start + 7000]

    conn = http.client.HTTPConnection("127.0.0.1", gw.listen_port, timeout=30)
    conn.request("POST", f"http://{DASHSCOPE}/", body=pieces(), encode_chunked=True,
                 headers={"content-type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200, resp.read()
    conn.close()
    [received] = fresh_providers[DASHSCOPE].requests  # the fake reads content-length bytes, as JSON
    assert received.body == {**json.loads(body), "model": "qwen1.5-72b-chat"}
    assert int(received.headers["content-length"]) == len(orjson.dumps(received.body))


def test_unknown_host_wrong_method_and_missing_body(gw, fresh_providers):
    assert_json_error(gw.request("unknown.example.com", CHAT), 404, "unknown_host")
    assert_json_error(gw.request(DASHSCOPE, None, method="GET"), 405, "method_not_allowed")
    assert_json_error(gw.request(DASHSCOPE, None), 400, "missing_body")
    assert fresh_providers[DASHSCOPE].requests == []


def test_unreachable_and_untrusted_providers_get_503(tmp_path, gateway_factory, ca, fresh_providers):
    config = tmp_path / "config"
    config.mkdir()
    (config / "p.yaml").write_text("---\n".join([
        provider_yaml("down", "down.example.test"),
        provider_yaml("wrong-name", "wrong-name.example.test"),
        provider_yaml("untrusted", "untrusted.example.test"),
    ]))
    # a fake whose certificate is for another name, and one signed by a CA Envoy does not trust
    from extproc.demo.ca import ThrowawayCA
    other_ca = ThrowawayCA(tmp_path / "other-ca")
    untrusted_cert = other_ca.issue(["untrusted.example.test"])
    untrusted = FakeProvider("untrusted", untrusted_cert.cert_file, untrusted_cert.key_file).start()
    try:
        gw = gateway_factory(config, extra=[
            "--resolve", f"down.example.test=127.0.0.1:{free_port()}",
            "--resolve", f"wrong-name.example.test=127.0.0.1:{fresh_providers[DASHSCOPE].port}",
            "--resolve", f"untrusted.example.test=127.0.0.1:{untrusted.port}",
        ])
        for host in ("down.example.test", "wrong-name.example.test", "untrusted.example.test"):
            assert_json_error(gw.request(host, CHAT), 503)
        # no request, and so no key, went over a connection that failed verification
        assert fresh_providers[DASHSCOPE].requests == []
        assert untrusted.requests == []
    finally:
        untrusted.stop()


def test_ext_proc_down_fails_closed(tmp_path, ca, fresh_providers, keys):
    """Envoy run on its own (`extproc envoy-config`) against `extproc serve`; the server dies."""
    from extproc.ops.up import envoy_binary
    from support.helpers import upstream_args

    control, ext_proc, listen, admin = free_port(), free_port(), free_port(), free_port()
    creds = token_files(tmp_path)
    env = {**__import__("os").environ, **keys}
    serve_log = (tmp_path / "serve.log").open("wb")
    serve = subprocess.Popen([sys.executable, "-m", "extproc", "serve", "--config", str(seed_dir(tmp_path, "01")),
                              "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
                              "--auth-token-file", str(creds.token_file),
                              *upstream_args(ca, fresh_providers)],
                             stdout=serve_log, stderr=subprocess.STDOUT, env=env)
    boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--control", f"127.0.0.1:{control}",
                           "--ext-proc", f"127.0.0.1:{ext_proc}", *creds.envoy_config_args(),
                           "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"],
                          capture_output=True, check=True, env=env).stdout
    assert keys["YOUR_DASHSCOPE_API_KEY"].encode() not in boot
    (tmp_path / "envoy.json").write_bytes(boot)
    envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "envoy.json"), "--disable-hot-restart",
                              "--concurrency", "1", "--log-level", "error"],
                             stdout=subprocess.DEVNULL, stderr=(tmp_path / "envoy.log").open("wb"))
    try:
        from support.helpers import Gateway
        gw = Gateway(envoy, listen, admin, tmp_path / "envoy.log")
        wait_until(lambda: _status(gw) == 200, 20,
                   lambda: f"no answer through envoy: {(tmp_path / 'serve.log').read_text()}")
        serve.kill()
        serve.wait()
        fresh_providers[DASHSCOPE].clear()
        for _ in range(5):
            resp = gw.request(DASHSCOPE, CHAT)
            assert resp.status >= 500
            assert_json_error(resp, resp.status)
        assert fresh_providers[DASHSCOPE].requests == []
    finally:
        serve.kill()
        envoy.terminate()
        envoy.wait(10)


def _status(gw) -> int:
    try:
        return gw.request(DASHSCOPE, CHAT).status
    except OSError:
        return 0


def test_slow_provider_gets_its_own_timeout_as_json_504(tmp_path, gateway_factory, fresh_providers):
    config = tmp_path / "config"
    config.mkdir()
    (config / "p.yaml").write_text(provider_yaml("quick", DASHSCOPE, key="${YOUR_DASHSCOPE_API_KEY}")
                                   .replace("  path: /v1/chat/completions",
                                            "  path: /v1/chat/completions\n  timeout: 1s"))
    gw = gateway_factory(config)
    assert gw.request(DASHSCOPE, CHAT, {"x-fake-delay": "0.2"}).status == 200
    started = __import__("time").monotonic()
    error = assert_json_error(gw.request(DASHSCOPE, CHAT, {"x-fake-delay": "3"}), 504, "upstream_timeout")
    assert __import__("time").monotonic() - started < 2.5
    assert "did not answer in time" in error["message"]


def test_client_cannot_set_envoy_or_gateway_headers(gw, fresh_providers):
    # a client's own (tiny) timeout and retry policy are not Envoy's to follow
    resp = gw.request(DASHSCOPE, CHAT, {"x-fake-delay": "0.3", "x-envoy-upstream-rq-timeout-ms": "1",
                                        "x-envoy-retry-on": "5xx", "x-llm-gateway-anything": "x"})
    assert resp.status == 200, resp.body
    (seen,) = fresh_providers[DASHSCOPE].requests
    assert not any(k.startswith(("x-envoy-", "x-llm-gateway-")) for k in seen.headers), seen.headers


@pytest.mark.parametrize("host", ["llm_gateway_control", "llm_provider_dashscope_aliyuncs_com", "127.0.0.1"])
def test_host_naming_an_internal_cluster_is_unknown(gw, fresh_providers, host):
    # as a Host header: not a host the gateway serves
    assert_json_error(gw.request(host, CHAT, proxy_form=False), 404, "unknown_host")
    # as a proxy-form URL, a name with '_' is not even a valid URL: Envoy refuses it
    resp = gw.request(host, CHAT)
    assert_json_error(resp, resp.status)
    assert resp.status in (400, 404)
    assert fresh_providers[DASHSCOPE].requests == []


def test_many_and_large_headers_get_envoys_limits_not_a_crash(gw, fresh_providers):
    big = gw.request(DASHSCOPE, CHAT, {"x-big": "a" * 70_000})
    assert big.status in (400, 431), big.status
    many = gw.request(DASHSCOPE, CHAT, {f"x-h{i}": "v" for i in range(200)})
    assert many.status in (200, 400, 431)
    assert gw.request(DASHSCOPE, CHAT).status == 200  # still serving
    assert gw.process.poll() is None


def test_duplicate_keys_last_one_wins(gw, fresh_providers):
    body = b'{"messages": [{"role": "user", "content": "a"}], "temperature": 0.1, "temperature": 0.9}'
    assert gw.request(DASHSCOPE, body).status == 200
    assert fresh_providers[DASHSCOPE].requests[-1].body["temperature"] == 0.9


def test_body_that_does_not_arrive_in_time_gets_408(tmp_path, gateway_factory, fresh_providers):
    """The ext_proc answers a request once its body is whole; a client that stops half way gets a
    JSON 408 after --body-timeout, and nothing reaches the provider."""
    gw = gateway_factory(seed_dir(tmp_path, "01"), extra=["--body-timeout", "1"])
    with socket.create_connection(("127.0.0.1", gw.listen_port), timeout=10) as sock:
        sock.sendall(f"POST http://{DASHSCOPE}/ HTTP/1.1\r\nHost: {DASHSCOPE}\r\ncontent-type: application/json\r\n"
                     f"content-length: 100\r\n\r\n{{\"messages\"".encode())
        answer = sock.recv(65536).decode()
    head, _, body = answer.partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 408"), answer
    error = json.loads(body)["error"]
    assert error["code"] == "request_timeout" and "1 s" in error["message"], error
    assert fresh_providers[DASHSCOPE].requests == []
    # the next request on a new connection is served as usual
    assert gw.request(DASHSCOPE, CHAT).status == 200
