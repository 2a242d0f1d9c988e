"""Failover across providers through the real Envoy: fake providers A, B, C, each failing on
request (x-fake-fail names one of them), each checking its own key (docs/failover.md)."""

from __future__ import annotations

import http.client
import json
import secrets

import pytest

from extproc.demo.ca import ThrowawayCA
from extproc.demo.fake_provider import FakeProvider
from support.helpers import CHAT, free_port, start_gateway, wait_until

A, B, C = "a.example.com", "b.example.com", "c.example.com"
ROUTE = "llm-failover"
KEYS = {A: "sk-test-a-" + secrets.token_hex(6), B: "sk-test-b-" + secrets.token_hex(6),
        C: "sk-test-c-" + secrets.token_hex(6)}
MODELS = {A: "model-a", B: "model-b", C: "model-c"}


def provider(host: str, extra: str = "") -> str:
    name = host.split(".")[0]
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: provider-{name}
spec:
  host: {host}
  configs:
    defaultConfig:
      openAIConfig:
        model: {MODELS[host]}
        apiKey: {KEYS[host]}
{extra}---
"""


def route(retries: str | None, fallback: bool = True) -> str:
    text = f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: failover
spec:
  host: {ROUTE}
  rules:
  - name: main
    backendRefs:
    - {{providerHost: {A}, weight: 100}}
    - {{providerHost: {B}, weight: 0}}
"""
    if fallback:
        text += f"    fallbackRefs:\n    - providerHost: {C}\n"
    if retries is not None:
        text += "    retries:\n" + "".join(f"      {line}\n" for line in retries.strip().splitlines())
    return text


RETRIES = """attempts: 1
perTryTimeout: 2s
retryOn: [connect-failure, reset, 5xx, 429]"""


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    ca = ThrowawayCA(tmp_path_factory.mktemp("failover-pki"))
    started = {}
    for host in (A, B, C):
        cert = ca.issue([host])
        started[host] = FakeProvider(host.split(".")[0], cert.cert_file, cert.key_file, api_key=KEYS[host]).start()
    # a provider whose certificate chains to another CA: Envoy must refuse it
    rogue_ca = ThrowawayCA(tmp_path_factory.mktemp("rogue-pki"), name="rogue CA")
    rogue_cert = rogue_ca.issue([A], stem="rogue-a")
    rogue = FakeProvider("a", rogue_cert.cert_file, rogue_cert.key_file, api_key=KEYS[A]).start()
    yield ca, started, rogue
    for fake in (*started.values(), rogue):
        fake.stop()


@pytest.fixture
def gateway(tmp_path, fakes):
    ca, started, _ = fakes
    running = []

    def start(config_text: str, resolve: dict[str, int] | None = None, extra: list[str] = ()):
        for fake in started.values():
            fake.clear()
        config = tmp_path / "config"
        config.mkdir(exist_ok=True)
        (config / "failover.yaml").write_text(config_text)
        ports = {host: fake.port for host, fake in started.items()} | (resolve or {})
        args = ["--upstream-ca", str(ca.cert_file), *extra]
        for host, port in ports.items():
            args += ["--resolve", f"{host}=127.0.0.1:{port}"]
        gw = start_gateway(config, tmp_path, {}, args)
        running.append(gw)
        return gw

    yield start
    for gw in running:
        gw.stop()


def config(retries: str | None = RETRIES, fallback: bool = True, a_extra: str = "") -> str:
    return provider(A, a_extra) + provider(B) + provider(C) + route(retries, fallback)


def answered_by(resp, host: str, fakes_by_host=None) -> None:
    assert resp.status == 200, (resp.body, fakes_by_host and {
        h: [(r.headers.get("x-envoy-attempt-count"), r.headers.get("authorization"), r.headers.get("host"))
            for r in f.requests]
        for h, f in fakes_by_host.items()})
    assert resp.json()["model"] == MODELS[host]


def check_keys(fakes_by_host: dict[str, FakeProvider]) -> None:
    """No provider ever received another provider's key, nor the gateway's internal headers' secrets."""
    for host, fake in fakes_by_host.items():
        for seen in fake.requests:
            assert seen.headers.get("authorization") == f"Bearer {KEYS[host]}", (host, seen.headers)
            assert seen.headers.get("host", "").split(":")[0] == host
            if isinstance(seen.body, dict):
                assert seen.body["model"] == MODELS[host]


@pytest.mark.parametrize("failure", ["500", "503", "429", "delay=4"])
def test_a_fails_b_answers(gateway, fakes, failure):
    _, started, _ = fakes
    gw = gateway(config())
    resp = gw.request(ROUTE, CHAT, {"x-fake-fail": f"a:{failure}"})
    answered_by(resp, B, started)
    assert len(started[A].requests) == 1 and len(started[B].requests) == 1 and not started[C].requests
    check_keys(started)
    # the access log: two attempts, the final provider is B, A was tried first
    entry = wait_until(lambda: [e for e in gw.access_entries() if e.get("kind") != "attempt"], 10)[-1]
    assert entry["attempts"] == 2 and entry["provider"] == "default/provider-b", entry
    assert entry["tried"] == A, entry
    attempt = wait_until(lambda: [e for e in gw.access_entries() if e.get("kind") == "attempt"], 10)[-1]
    assert attempt["upstream_cluster"] == "llm_failover_a_example_com"
    assert attempt["request_id"] == entry["request_id"] and entry["request_id"]  # the lines join
    # metrics: A's failed attempt by reason, a failover from A, B's answer
    reason = "timeout" if failure.startswith("delay") else failure
    metric = lambda name, **labels: gw.metrics().get((name, frozenset(labels.items())))  # noqa: E731
    wait_until(lambda: metric("llm_gateway_failovers_total", provider=A, reason=reason) == 1, 10,
               lambda: str(gw.metrics()))
    assert metric("llm_gateway_provider_attempts_total", provider=A, result=reason) == 1
    assert metric("llm_gateway_provider_attempts_total", provider=B, result="ok") == 1


def test_connection_refused_fails_over(gateway, fakes):
    _, started, _ = fakes
    closed = free_port()
    gw = gateway(config(), resolve={A: closed})
    answered_by(gw.request(ROUTE, CHAT), B)
    assert not started[A].requests and len(started[B].requests) == 1
    check_keys(started)


def test_untrusted_certificate_fails_over(gateway, fakes):
    _, started, rogue = fakes
    rogue.clear()
    gw = gateway(config(), resolve={A: rogue.port})
    answered_by(gw.request(ROUTE, CHAT), B)
    assert not rogue.requests, "a provider with an untrusted certificate received a request"
    assert len(started[B].requests) == 1
    check_keys(started)


def test_client_error_is_not_retried(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config())
    resp = gw.request(ROUTE, CHAT, {"x-fake-fail": "a:400"})
    assert resp.status == 400
    assert len(started[A].requests) == 1 and not started[B].requests


def test_all_failing_gives_the_last_answer_after_1_plus_attempts(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config("attempts: 2\nretryOn: [5xx]"))
    resp = gw.request(ROUTE, CHAT, {"x-fake-fail": "a:500,b:502,c:503"})
    assert resp.status == 503, resp.body
    assert [len(started[h].requests) for h in (A, B, C)] == [1, 1, 1]
    check_keys(started)
    # one log line per failed attempt, each with its own number (it said 0 for every one)
    lines = wait_until(lambda: len([e for e in gw.access_entries() if e.get("kind") == "attempt"]) == 3
                       and [e for e in gw.access_entries() if e.get("kind") == "attempt"], 10)
    assert [(e["attempt"], e["upstream_cluster"], e["status"]) for e in lines] == [
        ("1", "llm_failover_a_example_com", 500), ("2", "llm_failover_b_example_com", 502),
        ("3", "llm_failover_c_example_com", 503)]


def test_without_retries_a_500_reaches_the_client(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config(retries=None))
    resp = gw.request(ROUTE, CHAT, {"x-fake-fail": "a:500"})
    assert resp.status == 500
    assert len(started[A].requests) == 1 and not started[B].requests


def stream_body() -> dict:
    return {**CHAT, "stream": True}


def events(resp) -> list[dict]:
    return [json.loads(line[6:]) for line in resp.body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_stream_fails_over_before_its_first_byte(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config())
    resp = gw.request(ROUTE, stream_body(), {"x-fake-fail": "a:503"})
    assert resp.status == 200 and resp.headers["content-type"].startswith("text/event-stream")
    got = events(resp)
    assert got and all(e["model"] == MODELS[B] for e in got if "model" in e)
    assert resp.body.rstrip().endswith(b"data: [DONE]")
    assert len(started[A].requests) == 1 and len(started[B].requests) == 1
    check_keys(started)


def test_stream_cut_after_its_first_event_is_passed_on_cut(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config())
    status, body, cut = read_stream(gw, ROUTE, {"x-fake-fail": "a:cut=1"})
    # the answer had started (A's headers and first event): passed on as it is, cut, and never
    # retried; B is never asked. (When the cut reaches Envoy before A's headers have gone on to
    # the client, the client gets Envoy's 502 instead of a cut 200: timing.)
    assert (status == 200 and cut) or status == 502, (status, body)
    assert b"[DONE]" not in body and MODELS[B].encode() not in body
    assert len(started[A].requests) == 1 and not started[B].requests


def test_cool_down_skips_a_dead_provider_then_tries_it_again(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config(a_extra="  outlierDetection:\n    consecutiveErrors: 2\n    baseEjectionTime: 3s\n"))
    for _ in range(2):
        answered_by(gw.request(ROUTE, CHAT, {"x-fake-fail": "a:503"}), B)
    assert len(started[A].requests) == 2
    # the failures reach passive health through the access log (batched): A cools down
    wait_until(lambda: gw.metrics().get(("llm_gateway_provider_cooling_down", frozenset({("provider", A)}))) == 1,
               10, lambda: str(gw.metrics()))
    for _ in range(3):
        answered_by(gw.request(ROUTE, CHAT, {"x-fake-fail": "a:503"}), B)
    assert len(started[A].requests) == 2, "a provider cooling down was tried"
    # after the period A is tried again, and serves once healthy
    wait_until(lambda: gw.metrics().get(("llm_gateway_provider_cooling_down", frozenset({("provider", A)}))) == 0,
               10, lambda: str(gw.metrics()))
    answered_by(gw.request(ROUTE, CHAT), A)
    assert len(started[A].requests) == 3
    check_keys(started)
    metrics = gw.metrics()
    assert metrics[("llm_gateway_failovers_total", frozenset({("provider", A), ("reason", "503")}))] >= 2


def test_every_candidate_cooling_tries_the_primary_anyway(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config("attempts: 1\nretryOn: [5xx]", fallback=False)
                 .replace("  configs:",
                          "  outlierDetection: {consecutiveErrors: 1, baseEjectionTime: 60s}\n  configs:"))
    assert gw.request(ROUTE, CHAT, {"x-fake-fail": "a:500,b:500"}).status == 500
    def cooling(host):
        return gw.metrics().get(("llm_gateway_provider_cooling_down", frozenset({("provider", host)})))

    wait_until(lambda: cooling(A) == 1 and cooling(B) == 1, 10, lambda: str(gw.metrics()))
    answered_by(gw.request(ROUTE, CHAT), A)


def read_stream(gw, host: str, headers: dict[str, str]) -> tuple[int, bytes, bool]:
    """A streamed request: status, what arrived, and whether the answer was cut."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.listen_port, timeout=60)
    conn.request("POST", f"http://{host}/", body=json.dumps(stream_body()),
                 headers={"content-type": "application/json", **headers})
    resp = conn.getresponse()
    try:
        body, cut = resp.read(), False
    except http.client.IncompleteRead as error:
        body, cut = error.partial, True
    conn.close()
    return resp.status, body, cut


LONG_REPLY = " ".join(f"w{i}" for i in range(12))


def test_a_long_stream_that_keeps_sending_is_not_cut(gateway, fakes):
    """Six minutes scaled down: events every 0.4 s for about 5 s, with a 1 s idle bound and a
    1 s time to first byte (perTryTimeout); no total bound is configured."""
    _, started, _ = fakes
    gw = gateway(config("attempts: 1\nperTryTimeout: 1s\nretryOn: [5xx]"), extra=["--idle-timeout", "1"])
    status, body, cut = read_stream(gw, ROUTE, {"x-fake-reply": LONG_REPLY, "x-fake-event-delay": "0.4"})
    assert status == 200 and not cut, body
    assert body.rstrip().endswith(b"data: [DONE]")
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events_of(body) if e.get("choices")).split() \
        == LONG_REPLY.split()
    assert len(started[A].requests) == 1 and not started[B].requests


def test_a_stream_that_goes_silent_is_cut(gateway, fakes):
    _, started, _ = fakes
    gw = gateway(config(retries=None), extra=["--idle-timeout", "1"])
    status, body, cut = read_stream(gw, ROUTE, {"x-fake-reply": "one two three", "x-fake-event-delay": "3"})
    assert status == 200 and cut, body  # the first event went out; then 1 s of silence ends it
    assert b"[DONE]" not in body and len(events_of(body)) == 1


def test_a_body_near_the_failover_limit_is_kept_for_the_retry(gateway, fakes):
    """Envoy keeps the body for a retry only up to its buffer limit."""
    _, started, _ = fakes
    gw = gateway(config())
    big = {"messages": [{"role": "user", "content": "x" * 990_000}]}
    answered_by(gw.request(ROUTE, big, {"x-fake-fail": "a:503"}), B)
    assert len(started[B].requests[0].body["messages"][0]["content"]) == 990_000
    check_keys(started)


def test_a_larger_body_goes_in_one_attempt(gateway, fakes):
    """Past FAILOVER_BODY_MAX a request is sent once, as without retries (an Envoy 1.40 limit):
    served when the provider answers, its failure passed on when it does not; Envoy stays up."""
    _, started, _ = fakes
    gw = gateway(config(), extra=["--body-limit", "3m"])
    big = {"messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    answered_by(gw.request(ROUTE, big), A)
    assert gw.request(ROUTE, big, {"x-fake-fail": "a:503"}).status == 503
    assert not started[B].requests
    answered_by(gw.request(ROUTE, CHAT, {"x-fake-fail": "a:503"}), B)  # small ones still fail over
    assert "restarting it" not in gw.log()


def events_of(body: bytes) -> list[dict]:
    return [json.loads(line[6:]) for line in body.decode().splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


def test_under_load_with_a_failing_half_of_its_requests_no_client_errors(gateway, fakes, tmp_path):
    """wrk for a few seconds; A answers every second request it gets with a 503: every
    client request is answered 200 (by A or, after A's failure, by B)."""
    from extproc.testing.load import run_wrk

    _, started, _ = fakes
    gw = gateway(config())
    script = tmp_path / "failover.lua"
    body = json.dumps(CHAT).replace('"', '\\"')
    script.write_text(f'''
request = function()
  return wrk.format("POST", "/", {{["Host"] = "{ROUTE}", ["Content-Type"] = "application/json",
                                  ["x-fake-fail"] = "a:503/2"}}, "{body}")
end
''')
    result = run_wrk(gw.listen_port, script, connections=8, seconds=3)
    assert result["requests"] > 0 and result["errors"] == 0, result
    failed_a = sum(1 for r in started[A].requests) // 2
    assert failed_a > 0 and len(started[B].requests) >= failed_a * 0.9 - 1, \
        (len(started[A].requests), len(started[B].requests))
    check_keys(started)


def test_429_with_retry_after_moves_on_at_once(gateway, fakes):
    """A's Retry-After (60 s, past the client's own 30 s timeout) is not waited for: the
    request goes on to B."""
    _, started, _ = fakes
    gw = gateway(config())
    answered_by(gw.request(ROUTE, CHAT, {"x-fake-fail": "a:429", "x-fake-retry-after": "60"}), B)
    assert len(started[A].requests) == 1 and len(started[B].requests) == 1


def test_a_provider_that_never_answers_is_bounded_by_the_idle_timeout(gateway, fakes):
    """No total bound is configured: the idle bound still ends a wait for an answer, as a JSON 504."""
    gw = gateway(config(retries=None), extra=["--idle-timeout", "1"])
    resp = gw.request(ROUTE, CHAT, {"x-fake-delay": "3"})
    assert resp.status == 504 and resp.json()["error"]["code"] == "upstream_timeout", resp.body
    assert "stream_idle_timeout" in resp.json()["error"]["message"]
