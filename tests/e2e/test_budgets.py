"""Token and request budgets (LLMTokenRateLimit) through a real Envoy, with a real Redis shared by
two and four gateway instances: 429s with OpenAI's headers, usage charged from JSON and streamed
answers, budgets exact across instances (keys new to an instance, keys idle past the forget time,
concurrent requests on every instance), Redis outages and restarts (fail open, fail closed) and
live config changes."""

from __future__ import annotations

import itertools
import json
import threading
import time
import urllib.request

import pytest

from extproc.policy.budgets import bucket_id, key_hash
from support.helpers import CHAT, Gateway, seed_dir, wait_until

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
    # instance 2 never saw erin: Redis decides its very first request (issue 23: it used to pass)
    refused = ask(gw2, "erin")
    assert refused.status == 429 and refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert metric(gw2, "llm_gateway_budget_redis_admissions_total", reason="new") >= 1
    assert ask(gw2, "frank").status == 200  # another key is unaffected
    key = bucket_id("default/per-user", "everyone", key_hash("erin"))
    assert float(redis_server.client().hget(key, "tok")) >= 51 - 1  # drained a little since
    assert 0 < redis_server.client().pttl(key) <= 3600 * 1000 * 2  # expires once drained


def test_redis_killed_under_load_fails_open_and_comes_back(tmp_path, gateway_factory, redis_server):
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(budget_yaml(tokens=10_000_000, per="1h"))
    gw = gateway_factory(config, ["--redis", redis_server.url])
    statuses: list[int] = []
    stop = threading.Event()

    def load() -> None:
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


PLANS = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: plans, namespace: default}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules:
  - name: counted
    matches: [{headers: {x-plan: {exact: counted}}}]
    tokens: 1000000
    requests: 2
    per: 1h
  - name: burst
    matches: [{headers: {x-plan: {exact: burst}}}]
    tokens: 1000000
    requests: 10
    per: 1h
  - name: medium
    matches: [{headers: {x-plan: {exact: medium}}}]
    tokens: 200
    per: 1h
  - name: bound
    matches: [{headers: {x-plan: {exact: bound}}}]
    tokens: 100
    per: 1h
  - name: small
    tokens: 40
    per: 1h
"""
FORGET_S = 3  # LLM_GATEWAY_BUDGET_FORGET of the instances below: a key unused this long is forgotten
ANSWER_S = 0.2  # x-fake-delay of the concurrent requests: several of them in flight at once


def plan(gw, user: str, name: str = "small", **more: str):
    return ask(gw, user, {"x-plan": name, **more})


def spent(gw, rule: str) -> float:
    """Tokens this instance charged to `rule` of the plans."""
    return metric(gw, "llm_gateway_budget_tokens_charged_total", budget="default/plans", rule=rule)


def synced(gws) -> None:
    """Until every instance has synced twice more (each has read Redis after what came before)."""
    for gw in gws:
        before = metric(gw, "llm_gateway_budget_syncs_total")
        wait_until(lambda gw=gw, before=before: metric(gw, "llm_gateway_budget_syncs_total") >= before + 2, 10)


def hammer(gws, user: str, name: str, per_instance: int, headers: dict[str, str] | None = None) -> list[int]:
    """`per_instance` clients on every instance, each asking for `user` until refused twice (at most
    40 requests each): every status, in no order."""
    statuses: list[int] = []
    lock = threading.Lock()

    def client(gw) -> None:
        mine = Gateway(gw.process, gw.listen_port, gw.admin_port, gw.log_file)  # its own connection
        refused = 0
        for _ in range(40):
            status = plan(mine, user, name, **(headers or {})).status
            with lock:
                statuses.append(status)
            refused += status == 429
            if refused == 2:
                break

    threads = [threading.Thread(target=client, args=(gw,)) for gw in gws for _ in range(per_instance)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return statuses


@pytest.mark.parametrize("count", [2, 4])
def test_instances_on_one_redis_keep_each_budget_as_one_instance_would(tmp_path, gateway_factory, redis_server,
                                                                       count):
    """Issue 23: every key is limited as written whichever instances its requests reach: a key new
    to an instance is read from Redis before its first admission, one near its limit is admitted
    atomically by Redis, a key idle past the forget time is read again."""
    config = seed_dir(tmp_path, "01")
    (config / "10-budget.yaml").write_text(PLANS)
    gws = [gateway_factory(config, ["--redis", redis_server.url], env={"LLM_GATEWAY_BUDGET_FORGET": str(FORGET_S)})
           for _ in range(count)]

    # `requests: 2 per 1h`, three requests across the instances in every order: the third refused at once
    orders = list(itertools.product(range(count), repeat=3))
    if count > 2:
        orders = [o for o in orders if len(set(o)) == 3][:6] + [(0, 0, 3), (3, 2, 2), (1, 3, 1)]
    for order in orders:
        user = "carol-" + "".join(map(str, order))
        assert [plan(gws[i], user, "counted").status for i in order] == [200, 200, 429], order
        assert [plan(gw, user, "counted").status for gw in gws] == [429] * count, order  # and on every instance

    # spent on one instance: refused on every other at its very next request (new to them)
    for _ in range(3):
        assert plan(gws[0], "alice").status == 200
    wait_until(lambda: spent(gws[0], "small") == 51, 10)
    assert plan(gws[0], "alice").status == 429
    for gw in gws[1:]:
        refused = plan(gw, "alice")
        assert refused.status == 429 and refused.json()["error"]["type"] == "tokens"

    # a key every instance follows (each served it once), spent on one: refused on the others once
    # they hear from Redis (at most the access-log delay, a round trip and one sync later)
    for gw in gws:
        assert plan(gw, "bea", "medium").status == 200
    synced(gws)
    for _ in range(20):
        if plan(gws[0], "bea", "medium").status == 429:
            break
    else:
        raise AssertionError("bea was never refused on instance 1")
    spent_at = time.monotonic()
    for i, gw in enumerate(gws[1:], 2):
        wait_until(lambda gw=gw: plan(gw, "bea", "medium").status == 429, 10, lambda gw=gw: gw.log())
        print(f"instance {i} refused bea {time.monotonic() - spent_at:.3f} s after instance 1 did")

    # a key idle past the forget time: read from Redis again, so still refused
    assert plan(gws[1], "cal").status == 200
    forgotten_from = time.monotonic()
    for _ in range(2):
        assert plan(gws[0], "cal").status == 200
    wait_until(lambda: spent(gws[0], "small") == 51 + 2 * 17, 10)
    time.sleep(max(0.0, FORGET_S + 0.5 - (time.monotonic() - forgotten_from)))
    synced([gws[1]])  # a sync after the forget time forgot cal
    new_before = metric(gws[1], "llm_gateway_budget_redis_admissions_total", reason="new")
    assert plan(gws[1], "cal").status == 429
    assert metric(gws[1], "llm_gateway_budget_redis_admissions_total", reason="new") == new_before + 1

    # concurrent requests of one key on every instance: `requests: 10`, exactly ten admitted
    statuses = hammer(gws, "zed", "burst", 2, {"x-fake-delay": str(ANSWER_S)})
    assert statuses.count(200) == 10, sorted(statuses)
    assert set(statuses) == {200, 429}

    # and tokens (100, answers of 17): over by at most the answers in flight and those admitted before
    # the charge reached Redis: u * (c + rate * (F + R)), F the access-log delay (0.5 s), R a round trip
    started = time.monotonic()
    statuses = hammer(gws, "tom", "bound", 2, {"x-fake-delay": str(ANSWER_S)})
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    rate = admitted / max(elapsed, 1e-3)  # requests admitted per second, over every instance
    in_flight = 2 * count  # clients: each has one request in flight at most
    bound = 17 * (in_flight + rate * (0.5 + 0.5))  # R at its timeout: the bound, not the usual
    over = max(0, admitted * 17 - 100)
    print(f"{count} instances: tokens admitted {admitted * 17} of 100 (over by {over}), {rate:.0f} requests/s "
          f"admitted, bound {bound:.0f}")
    assert over <= bound
    assert set(statuses) == {200, 429}
    redis_trips = sum(metric(gw, "llm_gateway_budget_admission_round_trips_total") for gw in gws)
    print(f"admission round trips over all instances: {redis_trips:.0f}")


def test_redis_restarted_in_the_middle_fail_open_and_fail_closed(tmp_path, gateway_factory, redis_server):
    """Two instances failing open and two failing closed on one Redis, stopped in the middle and
    started again, empty: meanwhile open instances limit alone and closed ones answer 503; after,
    what the instances remember is put back, so spent keys are still refused where they are new."""
    config = seed_dir(tmp_path, "01", "04")
    (config / "10-budget.yaml").write_text(PLANS)
    opened = [gateway_factory(config, ["--redis", redis_server.url]) for _ in range(2)]
    closed = [gateway_factory(config, ["--redis", redis_server.url, "--redis-fail-closed"]) for _ in range(2)]
    everyone = opened + closed
    assert [plan(opened[0], "pat", "counted").status for _ in range(2)] == [200, 200]
    for _ in range(3):
        assert plan(closed[0], "quin").status == 200
    wait_until(lambda: spent(closed[0], "small") == 51, 10)
    synced([opened[0], closed[0]])

    redis_server.kill()
    for gw in everyone:
        wait_until(lambda gw=gw: metric(gw, "llm_gateway_budget_redis_up") == 0, 10, lambda gw=gw: gw.log())
    # failing open: each instance limits alone with what it knows
    assert plan(opened[0], "pat", "counted").status == 429
    assert [plan(opened[1], "rae", "counted").status for _ in range(3)] == [200, 200, 429]
    # failing closed: limited requests get 503, others are served
    for gw in closed:
        unavailable = plan(gw, "sal")
        assert unavailable.status == 503 and unavailable.json()["error"]["code"] == "rate_limit_unavailable"
        assert ask(gw, "sal", host=MOONSHOT).status == 200

    redis_server.start()  # empty
    for gw in everyone:
        wait_until(lambda gw=gw: metric(gw, "llm_gateway_budget_redis_up") == 1, 10, lambda gw=gw: gw.log())
    # each key is refused by an instance that never saw it: its followers put it back in Redis
    assert plan(opened[0], "rae", "counted").status == 429
    assert plan(opened[1], "pat", "counted").status == 429
    assert plan(closed[1], "quin").status == 429
    assert plan(closed[1], "sal").status == 200  # and new keys are served again
    assert all(gw.log().count("unreachable") == 1 for gw in everyone)  # one warning per outage



PRICED = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: dashscope-prices}
spec:
  host: dashscope.aliyuncs.com
  currency: CNY
  models:
  - {model: qwen1.5-72b-chat, input: "1.00", output: "2.00", cachedInput: "0.25"}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: spend-cap, namespace: default}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules:
  - name: team
    tokens: 1000000
    cost: "0.0001"
    per: 30d
"""


def cost_charged(gw) -> float:
    return metric(gw, "llm_gateway_budget_cost_charged_total", budget="default/spend-cap", rule="team",
                  currency="CNY")


def test_a_cost_cap_trips_exactly_across_two_instances_on_one_redis(tmp_path, gateway_factory, redis_server):
    """Issue 28: a cost cap (0.0001 CNY per 30 days) kept as tokens are: admitted while what the
    key's answers cost is below it, wherever they were served, charged the exact cost of each
    answer (cached tokens at their price, streamed answers from their usage event) on the
    instance that served it, shared through Redis. Answers of 8 prompt and 9 completion tokens
    cost 0.000026 (0.00002375 with 3 prompt tokens cached): the fourth answer spends the cap,
    the fifth request is refused on both instances, with the tokens far from spent."""
    config = seed_dir(tmp_path, "01")
    (config / "10-priced.yaml").write_text(PRICED)
    gws = [gateway_factory(config, ["--redis", redis_server.url]) for _ in range(2)]
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    sends = [(gws[0], chat, {"x-fake-cached-tokens": "3"}), (gws[1], {**chat, "stream": True}, {}),
             (gws[0], chat, {}), (gws[1], {**chat, "stream": True}, {})]
    told = []
    charged = 0.0
    for gw, body, more in sends:
        resp = gw.request(DASHSCOPE, body, {"x-user-id": "ada", **SEVENTEEN, **more})
        assert resp.status == 200, resp.body
        told.append((resp.headers["x-ratelimit-limit-cost"], resp.headers["x-ratelimit-remaining-cost"]))
        assert resp.headers["x-ratelimit-limit-tokens"] == "1000000"  # the tokens' headers beside
        wait_until(lambda before=charged: sum(cost_charged(g) for g in gws) > before + 1e-9, 10,
                   lambda: str([g.metrics() for g in gws]))
        charged = sum(cost_charged(g) for g in gws)
        synced(gws)  # the charge is in Redis, and both instances have read it
    # each admission told what was left before it: 0.0001, then less each answer's exact cost
    assert told == [("0.0001", "0.0001"), ("0.0001", "0.000076"), ("0.0001", "0.00005"), ("0.0001", "0.000024")]
    assert charged == pytest.approx(0.00002375 + 3 * 0.000026)
    for gw in gws:  # 0.00010175 spent: refused on either instance, by the cost cap, tokens far from spent
        refused = gw.request(DASHSCOPE, chat, {"x-user-id": "ada", **SEVENTEEN})
        assert refused.status == 429, refused.body
        assert refused.json()["error"]["type"] == "cost" and refused.json()["error"]["code"] == "rate_limit_exceeded"
        assert refused.headers["x-ratelimit-remaining-cost"] == "0" and int(refused.headers["retry-after"]) > 0
    assert sum(metric(gw, "llm_gateway_budget_refused_total", budget="default/spend-cap", reason="cost")
               for gw in gws) == 2
    # another key, new to both instances, has its own cap
    other = gws[1].request(DASHSCOPE, chat, {"x-user-id": "bo", **SEVENTEEN})
    assert other.status == 200 and other.headers["x-ratelimit-remaining-cost"] == "0.0001"
    # Redis holds the cost bucket in pico-units of CNY, apart from the tokens
    held = float(redis_server.client().hget(bucket_id("default/spend-cap", "team", key_hash("ada"), cost=True), "tok"))
    assert held == pytest.approx(101_750_000, rel=1e-3)
    # the access log names the cap and what was left (each entry once Envoy flushed its file)
    def remaining_told() -> set[str]:
        return {e["budget_remaining_cost"] for g in gws for e in g.access_entries()
                if e.get("budget") == "default/spend-cap" and e["status"] == 200}

    wait_until(lambda: remaining_told() >= {"0.0001", "0.000076", "0.00005", "0.000024"}, 10,
               lambda: f"the access log told {sorted(remaining_told())}")

    # concurrent requests of one key on both instances: over the cap by at most what the answers in
    # flight and those admitted before the charge reached Redis cost (the bound of token budgets)
    started = time.monotonic()
    statuses = hammer(gws, "cyd", "team", 2, {"x-fake-delay": str(ANSWER_S)})
    elapsed = time.monotonic() - started
    admitted = statuses.count(200)
    rate = admitted / max(elapsed, 1e-3)
    bound = 0.000026 * (4 + rate * (0.5 + 0.5))
    print(f"cost admitted {admitted * 0.000026:.6f} of 0.0001 at {rate:.0f} requests/s, bound {bound:.6f} over")
    assert set(statuses) == {200, 429} and admitted * 0.000026 - 0.0001 <= bound
