"""Token and request budgets (LLMTokenRateLimit) through a real Envoy, with a real Redis shared by
two gateway instances: 429s with OpenAI's headers, usage charged from JSON and streamed answers,
Redis outages (fail open, fail closed) and live config changes."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import urllib.request

import pytest
import redis

from extproc.policy.budgets import bucket_id, key_hash
from support.helpers import CHAT, free_port, seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
SEVENTEEN = {"x-fake-total-tokens": "17"}


def budget_yaml(tokens: int = 40, per: str = "1h", requests: int | None = None, name: str = "per-user",
                host: str = DASHSCOPE) -> str:
    extra = f"\n    requests: {requests}" if requests is not None else ""
    return f"""apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {{name: {name}, namespace: default}}
spec:
  host: {host}
  key: {{header: x-user-id}}
  rules:
  - name: subscribers
    matches:
    - headers: {{user-type: {{exact: subscriber}}}}
    tokens: 100000
    per: 1h
  - name: everyone
    tokens: {tokens}
    per: {per}{extra}
"""


class RedisServer:
    """A throwaway redis-server on a free port: no persistence, stopped after the test."""

    def __init__(self, tmp_path):
        self.port = free_port()
        self.dir = tmp_path
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.dir)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = self.client()
        wait_until(lambda: self._pings(client), 10, lambda: "redis-server did not start")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1)

    @staticmethod
    def _pings(client: redis.Redis) -> bool:
        try:
            return client.ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()


def metric(gw, name: str, **labels) -> float:
    wanted = set(labels.items())
    return sum(v for (n, ls), v in gw.metrics().items() if n == name and wanted <= set(ls))


def charged(gw) -> float:
    return metric(gw, "llm_gateway_budget_tokens_charged_total")


def ask(gw, user: str, headers: dict[str, str] | None = None, host: str = DASHSCOPE):
    return gw.request(host, CHAT, {"x-user-id": user, **SEVENTEEN, **(headers or {})})


def readyz(gw) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gw.metrics_port}/readyz", timeout=5) as r:
        return r.read().decode()


def test_budget_refuses_fourth_request_with_openai_headers_then_bigger_budget_applies_live(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=40, per="1h"))
    gw = gateway_factory(config)
    for n in range(1, 4):
        resp = ask(gw, "alice")
        assert resp.status == 200, resp.body
        assert resp.headers["x-ratelimit-limit-tokens"] == "40"
        assert "x-ratelimit-limit-requests" not in resp.headers  # no `requests` in the rule: no header
        wait_until(lambda n=n: charged(gw) == 17 * n, 10, lambda: f"not charged: {gw.metrics()}")
    resp = ask(gw, "alice")
    assert resp.status == 429, resp.body
    error = resp.json()["error"]
    assert error["code"] == "rate_limit_exceeded" and error["type"] == "tokens"
    assert resp.headers["content-type"] == "application/json"
    assert resp.headers["x-ratelimit-limit-tokens"] == "40"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "0"
    # 11 tokens over, refilled at 40 per hour: about 990 s
    assert 900 <= int(resp.headers["retry-after"]) <= 991
    assert resp.headers["x-ratelimit-reset-tokens"].endswith("s") and "h" in resp.headers["x-ratelimit-reset-tokens"]
    assert metric(gw, "llm_gateway_budget_refused_total", budget="default/per-user", rule="everyone",
                  reason="tokens") == 1
    # the refusal is counted under its route and operation (its llm_route was empty)
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="rejected", llm_route="default/dashscope-qwen",
                              gen_ai_operation_name="chat") == 1, 10, lambda: str(gw.metrics()))
    other = ask(gw, "bob")  # another key has its own budget
    assert other.status == 200 and other.headers["x-ratelimit-remaining-tokens"] == "40"
    assert ask(gw, "alice", {"user-type": "subscriber"}).status == 200  # another rule, another bucket

    # the access log names object, rule and the hashed key (never the raw value) and what remains
    entries = [e for e in gw.access_entries() if e.get("budget")]
    assert entries and all("alice" not in json.dumps(e) and "bob" not in json.dumps(e) for e in entries)
    first = entries[0]
    assert (first["budget"], first["budget_rule"], first["budget_key"]) == ("default/per-user", "everyone",
                                                                            key_hash("alice"))
    assert first["budget_remaining_tokens"] == "40"

    # a live change to a bigger budget applies without a restart
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=1000, per="1h"))
    wait_until(lambda: ask(gw, "alice").status == 200, 10, lambda: gw.log())
    assert ask(gw, "alice").headers["x-ratelimit-limit-tokens"] == "1000"


def test_a_budget_added_and_removed_live_brings_and_takes_its_headers(tmp_path, gateway_factory):
    """The x-ratelimit-* headers are in Envoy's routes only while the config has a budget: adding
    the first one republishes the routes with them, removing the last one without."""
    config = seed_dir(tmp_path, "01")
    gw = gateway_factory(config)
    assert "x-ratelimit-limit-tokens" not in ask(gw, "dave").headers
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=10_000_000, per="1h"))

    def admitted_with_headers() -> bool:  # admitted: the headers come from the routes, not a 429's own
        resp = ask(gw, "dave")
        assert resp.status == 200, resp.body
        return resp.headers.get("x-ratelimit-limit-tokens") == "10000000"

    wait_until(admitted_with_headers, 10, lambda: gw.log())
    (config / "10-budget.yaml").unlink()
    wait_until(lambda: "x-ratelimit-limit-tokens" not in ask(gw, "dave").headers, 10, lambda: gw.log())
    assert ask(gw, "dave").status == 200


def test_bucket_refills_after_its_period(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=40, per="2s"))
    gw = gateway_factory(config)
    # one answer of 200 tokens overdraws a 40-per-2s bucket by 160: refused for about 8 s
    assert ask(gw, "carol", {"x-fake-total-tokens": "200"}).status == 200
    wait_until(lambda: charged(gw) == 200, 10)
    refused = ask(gw, "carol")
    assert refused.status == 429 and 1 <= int(refused.headers["retry-after"]) <= 9
    wait_until(lambda: ask(gw, "carol").status == 200, 30, lambda: "the bucket never refilled")


def test_streamed_answer_charged_its_usage_and_provider_error_charges_nothing(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=1000, per="1h"))
    gw = gateway_factory(config)
    body = {"messages": [{"role": "user", "content": "Hi there"}], "stream": True}
    resp = gw.request(DASHSCOPE, body, {"x-user-id": "dave", **SEVENTEEN})
    assert resp.status == 200 and b"data: [DONE]" in resp.body
    assert resp.headers["x-ratelimit-remaining-tokens"] == "1000"
    wait_until(lambda: charged(gw) == 17, 10, lambda: f"stream not charged: {gw.metrics()}")
    failed = gw.request(DASHSCOPE, CHAT, {"x-user-id": "dave", "x-fake-status": "500", **SEVENTEEN})
    assert failed.status == 500
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="provider_error") == 1, 10)
    assert charged(gw) == 17
    assert ask(gw, "dave").headers["x-ratelimit-remaining-tokens"] == str(1000 - 17)


def test_two_instances_share_one_redis(tmp_path, gateway_factory, redis_server):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=40, per="1h"))
    gw1 = gateway_factory(config, ["--redis", redis_server.url])
    gw2 = gateway_factory(config, env={"LLM_GATEWAY_REDIS_URL": redis_server.url})  # the variable works too
    for _ in range(3):
        assert ask(gw1, "erin").status == 200
    wait_until(lambda: charged(gw1) == 51, 10)
    spent_at = time.monotonic()
    # instance 2 refuses erin within the bound (sync interval plus a round trip)
    wait_until(lambda: ask(gw2, "erin").status == 429, 10, lambda: gw2.log())
    print(f"instance 2 refused {time.monotonic() - spent_at:.3f} s after instance 1 charged")
    assert ask(gw2, "frank").status == 200  # another key is unaffected
    key = bucket_id("default/per-user", "everyone", key_hash("erin"))
    assert float(redis_server.client().hget(key, "tok")) >= 51 - 1  # drained a little since
    assert 0 < redis_server.client().pttl(key) <= 3600 * 1000 * 2  # expires once drained


def test_request_limit_is_shared_and_refused_at_once(tmp_path, gateway_factory, redis_server):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=100000, per="1h", requests=2))
    gw1 = gateway_factory(config, ["--redis", redis_server.url])
    gw2 = gateway_factory(config, ["--redis", redis_server.url])
    first = ask(gw1, "gina")
    assert first.status == 200 and first.headers["x-ratelimit-remaining-requests"] == "1"
    # instance 2 has not read gina's bucket yet: its first request is decided on what it knows (the
    # documented bound); each instance has seen the key from here on
    assert ask(gw2, "gina").status == 200
    key = bucket_id("default/per-user", "everyone", key_hash("gina"))
    wait_until(lambda: float(redis_server.client().hget(key, "req") or 0) >= 1.99, 10)
    for gw in (gw1, gw2):  # a sync of each instance after Redis held both requests
        syncs = metric(gw, "llm_gateway_budget_syncs_total")
        wait_until(lambda gw=gw, syncs=syncs: metric(gw, "llm_gateway_budget_syncs_total") >= syncs + 2, 10)
    for gw in (gw1, gw2):  # the third request is refused at once, on either instance
        third = ask(gw, "gina")
        assert third.status == 429 and third.json()["error"]["type"] == "requests"
        assert third.headers["x-ratelimit-remaining-requests"] == "0"
    assert ask(gw2, "hank").status == 200


def test_redis_killed_under_load_fails_open_and_comes_back(tmp_path, gateway_factory, redis_server):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=10_000_000, per="1h"))
    gw = gateway_factory(config, ["--redis", redis_server.url])
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
        from support.helpers import Gateway

        client = Gateway(gw.process, gw.listen_port, gw.admin_port, gw.log_file)  # its own connection
        for _ in range(400):  # bounded
            if stop.is_set():
                break
            statuses.append(client.request(DASHSCOPE, CHAT, {"x-user-id": "load"}).status)

    worker = threading.Thread(target=load)
    worker.start()
    try:
        wait_until(lambda: len(statuses) >= 10, 30)
        redis_server.kill()
        wait_until(lambda: metric(gw, "llm_gateway_budget_redis_up") == 0, 10, lambda: gw.log())
        count = len(statuses)
        wait_until(lambda: len(statuses) >= count + 10, 30)  # still serving while Redis is down
        assert "degraded" in readyz(gw)
        assert metric(gw, "llm_gateway_budget_redis_errors_total") >= 1
        redis_server.start()
        wait_until(lambda: metric(gw, "llm_gateway_budget_redis_up") == 1, 10, lambda: gw.log())
    finally:
        stop.set()
        worker.join(60)
    assert statuses and set(statuses) == {200}, sorted(set(statuses))
    assert gw.log().count("unreachable") == 1  # logged once per outage
    assert readyz(gw) == "ready\n"
    # limits apply again, through the restarted Redis
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=40, per="1h", name="small"))
    wait_until(lambda: metric(gw, "llm_gateway_budget_refused_total") > 0
               or ask(gw, "ivy").status == 429, 20, lambda: gw.log())
    key = bucket_id("default/small", "everyone", key_hash("ivy"))
    wait_until(lambda: redis_server.client().exists(key), 10)


def test_fail_closed_answers_503_while_redis_is_down(tmp_path, gateway_factory, redis_server):
    config = seed_dir(tmp_path, "01", "04")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=100000, per="1h"))
    gw = gateway_factory(config, ["--redis", redis_server.url, "--redis-fail-closed"])
    assert ask(gw, "jack").status == 200
    redis_server.kill()
    wait_until(lambda: ask(gw, "jack").status == 503, 10, lambda: gw.log())
    resp = ask(gw, "jack")
    assert resp.headers["content-type"] == "application/json"
    assert resp.json()["error"]["code"] == "rate_limit_unavailable"
    assert resp.json()["error"]["type"] == "server_error"  # the gateway's own store, not a provider
    assert ask(gw, "jack", host=MOONSHOT).status == 200  # no budget on that host: served
    redis_server.start()
    wait_until(lambda: ask(gw, "jack").status == 200, 10, lambda: gw.log())
