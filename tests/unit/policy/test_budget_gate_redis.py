"""The budget gate shared through a real Redis (Debian's redis-server, a throwaway one per test):
which admissions wait for Redis (a bucket new to an instance, one near its limit) and which do
not (far from its limit), requests counted exactly across instances, requests of one bucket
waiting at once decided in one script call, Redis unreachable or silent (fail open, fail
closed), a Redis that restarts empty, buckets forgotten. Several gates on one Redis are several
instances. In process (no Redis): policy/test_budget_gate.py."""

from __future__ import annotations

import asyncio
import itertools
import math
import socket

import pytest
from prometheus_client import CollectorRegistry

from extproc.errors import GatewayError
from extproc.policy import budget_gate
from extproc.policy.budget_gate import Admitted, BudgetGate, Waiting, lease_wanted, near_level
from extproc.policy.budgets import BudgetRefused, BudgetRule, bucket_id, key_hash
from support.budget_docs import budget_doc, headers
from support.manifests import DASHSCOPE, load_docs, provider

SYNC_S = 0.02  # the gates' sync interval here: syncs come quickly, the tests wait less


@pytest.mark.parametrize(("rule", "growth", "answer", "level"), [
    # no answer charged yet: what a few answers are is unknown, Redis decides
    (BudgetRule("t", (), tokens=40, per_s=3600.0), 0, 0, -math.inf),
    # a few answers' worth (two of the largest charge)
    (BudgetRule("t", (), tokens=40, per_s=3600.0), 0, 17, 6),
    # a busy bucket: twice what all instances charged per sync interval, when that is more
    (BudgetRule("r", (), tokens=10**6, per_s=3600.0, requests=600), 1000, 300, 10**6 - 2000),
    (BudgetRule("r", (), tokens=10**6, per_s=3600.0, requests=600), 0, 300, 10**6 - 600),
])
def test_near_level(rule, growth, answer, level):
    assert near_level(rule, growth, answer) == level


@pytest.mark.parametrize(("served", "wanted"), [(0, 0), (0.25, 0), (0.5, 2), (1, 2), (2.5, 6), (10, 20)])
def test_the_lease_wanted_is_twice_what_was_served(served, wanted):
    assert lease_wanted(served) == wanted


def instances(tmp_path, redis_server, rules: list[dict], count: int = 2, **options) -> tuple[str, list[BudgetGate]]:
    """`count` gates on one Redis, as `count` gateway instances: the route they limit and them."""
    compiled = load_docs(tmp_path, provider("dashscope", DASHSCOPE), budget_doc(rules))
    url = options.pop("url", redis_server.url)
    gates = []
    for _ in range(count):
        registry = CollectorRegistry()
        gate = BudgetGate(registry, lambda: compiled.table, redis_url=url, sync_interval=SYNC_S, **options)
        gate.registry = registry  # for sample()
        gates.append(gate)
    return compiled.table.route_for(DASHSCOPE).name, gates


def running(gates: list[BudgetGate], scenario):
    """Runs `scenario()` with the gates started (their Redis task and timers), stopped after."""
    async def main():
        for gate in gates:
            await gate.start()
        try:
            return await scenario()
        finally:
            for gate in gates:
                await gate.stop()
    return asyncio.run(main())


async def outcome(gate: BudgetGate, route: str, user: str, **more: str) -> Admitted | GatewayError | None:
    """What a request of `user` gets, waiting for Redis where the gate says so."""
    try:
        result = gate.admit(route, headers(x_user_id=user, **more))
    except GatewayError as error:
        return error
    if isinstance(result, Waiting):
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        result.then(future.set_result)
        return await asyncio.wait_for(future, 5)
    return result


def status(result: Admitted | GatewayError | None) -> int:
    return result.status if isinstance(result, GatewayError) else 200


def sample(gate: BudgetGate, name: str, **labels: str) -> float:
    return gate.registry.get_sample_value(name, labels) or 0.0


async def until(predicate, what: str) -> None:
    """Until `predicate()` holds (at most 10 s)."""
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(what)


async def synced(gate: BudgetGate, times: int = 2) -> None:
    """Until the gate's Redis task has synced `times` more times."""
    start = sample(gate, "llm_gateway_budget_syncs_total")
    for _ in range(500):
        if sample(gate, "llm_gateway_budget_syncs_total") >= start + times:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the gate did not sync")


def bucket(user: str, rule: str = "everyone") -> str:
    return bucket_id("default/per-user", rule, key_hash(user))


def test_a_bucket_new_to_an_instance_waits_for_redis_then_far_from_its_limit_is_admitted_from_memory(
        tmp_path, redis_server):
    route, (gate,) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 10**9, "requests": 1000,
                                                          "per": "30d"}], count=1)

    async def scenario():
        first = gate.admit(route, headers(x_user_id="ann"))
        assert isinstance(first, Waiting)  # never seen here: Redis admits it, and counts it
        assert sample(gate, "llm_gateway_budget_redis_admissions_total", reason="new") == 1
        admitted = await outcome(gate, route, "ann")  # a second one, waiting too
        assert status(admitted) == 200
        gate.charge([bucket("ann")], 50)  # an answer's usage: now a few answers' worth is known
        # a steady flow of ann's requests: once the gate knows its pace, from memory (a lease Redis
        # counted for this instance), with no round trip
        waited = []
        for _ in range(40):
            result = gate.admit(route, headers(x_user_id="ann"))
            waited.append(isinstance(result, Waiting))
            if isinstance(result, Waiting):
                future = asyncio.get_running_loop().create_future()
                result.then(future.set_result)
                assert status(await asyncio.wait_for(future, 5)) == 200
            await asyncio.sleep(SYNC_S / 4)
        round_trips = sample(gate, "llm_gateway_budget_admission_round_trips_total")
        direct = [gate.admit(route, headers(x_user_id="ann")) for _ in range(3)]
        assert all(isinstance(d, Admitted) for d in direct), waited
        assert sample(gate, "llm_gateway_budget_admission_round_trips_total") == round_trips
        assert direct[-1].as_dict()["ratelimit_remaining_requests"] == str(1000 - 45)
        held = gate._mirror[bucket("ann")][4]
        in_redis = float(redis_server.client().hget(bucket("ann"), "req"))
        await gate.stop()  # gives its lease back
        return waited, held, in_redis, float(redis_server.client().hget(bucket("ann"), "req"))

    waited, held, in_redis, after_stop = running([gate], scenario)
    assert waited[0] and not any(waited[-10:])  # the flow's first waits for Redis, its last ones do not
    assert held >= 1 and in_redis == pytest.approx(45 + held, abs=0.01)  # Redis counts the lease as it grants it
    assert after_stop == pytest.approx(45, abs=0.01)  # every request counted once, the lease given back


def test_requests_limit_is_exact_across_instances_in_every_order(tmp_path, redis_server):
    route, gates = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 10**6, "requests": 2,
                                                       "per": "1h"}])

    async def scenario():
        seen = {}
        for order in itertools.product((0, 1), repeat=3):
            user = "carol-" + "".join(map(str, order))
            seen[order] = [status(await outcome(gates[i], route, user)) for i in order]
        # once both instances follow every key (and have synced), still refused at once, on either
        for gate in gates:
            await synced(gate)
        for order in seen:
            user = "carol-" + "".join(map(str, order))
            seen[order] += [status(await outcome(gate, route, user)) for gate in gates]
        return seen

    for order, statuses in running(gates, scenario).items():
        assert statuses == [200, 200, 429, 429, 429], order


def test_a_key_spent_on_one_instance_is_refused_on_another_at_its_next_request(tmp_path, redis_server):
    route, (a, b) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "per": "1h"}])

    async def scenario():
        for _ in range(3):
            assert status(await outcome(a, route, "alice")) == 200
        a.charge([bucket("alice")], 51)  # the three answers' usage, in one access-log batch
        assert status(await outcome(a, route, "alice")) == 429  # refused here at once
        await synced(a, 1)  # the charge is in Redis
        refused = await outcome(b, route, "alice")  # b never saw alice: Redis decides, not b's memory
        assert isinstance(refused, BudgetRefused)
        assert dict(refused.headers)["x-ratelimit-remaining-tokens"] == "0"
        return status(await outcome(b, route, "bob"))

    assert running([a, b], scenario) == 200  # another key is not limited


def test_requests_waiting_at_once_for_one_bucket_go_in_one_script_call(tmp_path, redis_server):
    route, gates = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 10**6, "requests": 3,
                                                       "per": "1h"}], count=3)

    async def scenario():
        # five requests of one new key on each of three instances, all waiting at once
        results = await asyncio.gather(*[outcome(gate, route, "dan") for gate in gates for _ in range(5)])
        return [status(r) for r in results], [sample(g, "llm_gateway_budget_admission_round_trips_total")
                                              for g in gates]

    statuses, round_trips = running(gates, scenario)
    assert statuses.count(200) == 3 and statuses.count(429) == 12  # exactly the limit, over three instances
    assert round_trips == [1, 1, 1]  # one round trip per instance carried its five


def test_redis_unreachable_fails_open_from_memory_and_sends_what_is_owed_when_back(tmp_path, redis_server):
    route, (gate,) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "requests": 3,
                                                         "per": "1h"}], count=1)

    async def scenario():
        assert status(await outcome(gate, route, "erin")) == 200  # read from Redis, counted there
        redis_server.kill()
        # waiting for Redis (or not, if a sync found it gone first): decided from memory, erin's one request
        assert status(await outcome(gate, route, "erin")) == 200
        assert gate.degraded
        counted = [status(await outcome(gate, route, "erin")) for _ in range(2)]
        fresh = gate.admit(route, headers(x_user_id="fay"))  # a new key: admitted from memory alone, at once
        assert isinstance(fresh, Admitted)
        redis_server.start()  # empty
        await until(lambda: not gate.degraded, "Redis was not seen back")
        await synced(gate)
        return counted, fresh, float(redis_server.client().hget(bucket("erin"), "req"))

    counted, fresh, in_redis = running([gate], scenario)
    assert counted == [200, 429]  # this instance kept limiting alone: three requests
    assert in_redis == pytest.approx(3, abs=0.01)  # what it remembered is put back in the restarted Redis
    assert sample(gate, "llm_gateway_budget_redis_errors_total") >= 1


def test_redis_unreachable_fails_closed_for_waiting_and_new_requests(tmp_path, redis_server):
    route, (gate,) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "per": "1h"}], count=1,
                               fail_closed=True)

    async def scenario():
        redis_server.kill()
        waited = await outcome(gate, route, "gus")  # waiting when the round trip fails: 503
        await until(lambda: gate.degraded, "Redis was not seen gone")
        later = await outcome(gate, route, "gus")  # and while degraded, at once
        redis_server.start()
        await until(lambda: not gate.degraded, "Redis was not seen back")
        return waited, later, await outcome(gate, route, "gus")

    waited, later, back = running([gate], scenario)
    for refused in (waited, later):
        assert isinstance(refused, GatewayError) and (refused.status, refused.code) == (503, "rate_limit_unavailable")
    assert status(back) == 200
    assert sample(gate, "llm_gateway_budget_refused_total", budget="default/per-user", rule="everyone",
                  reason="unavailable") == 2


def test_a_request_waits_no_longer_than_the_admission_timeout(tmp_path, redis_server, monkeypatch):
    """A Redis that accepts the connection and never answers (a stalled server): the request is
    decided without it after ADMISSION_TIMEOUT_S, from memory (fail open) or 503 (fail closed)."""
    monkeypatch.setattr(budget_gate, "ADMISSION_TIMEOUT_S", 0.2)
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    url = f"redis://127.0.0.1:{silent.getsockname()[1]}/0"
    try:
        route, (open_gate,) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "per": "1h"}],
                                        count=1, url=url)
        _, (closed_gate,) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "per": "1h"}],
                                      count=1, url=url, fail_closed=True)

        async def scenario():
            return await outcome(open_gate, route, "hal"), await outcome(closed_gate, route, "hal")

        opened, closed = running([open_gate, closed_gate], scenario)
    finally:
        silent.close()
    assert status(opened) == 200 and status(closed) == 503
    for gate in (open_gate, closed_gate):
        assert sample(gate, "llm_gateway_budget_admission_fallbacks_total", reason="timeout") == 1


def test_a_bucket_unused_past_the_forget_time_is_read_from_redis_again(tmp_path, redis_server):
    route, (a, b) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "per": "1h"}],
                              forget_s=0.1)

    async def scenario():
        assert status(await outcome(b, route, "ivy")) == 200  # b follows ivy ...
        await asyncio.sleep(0.3)  # ... and forgets her, unused
        await synced(b)
        assert bucket("ivy") not in b._mirror
        assert status(await outcome(a, route, "ivy")) == 200
        a.charge([bucket("ivy")], 45)
        await synced(a, 1)
        new_before = sample(b, "llm_gateway_budget_redis_admissions_total", reason="new")
        refused = await outcome(b, route, "ivy")
        return refused, sample(b, "llm_gateway_budget_redis_admissions_total", reason="new") - new_before

    refused, read_again = running([a, b], scenario)
    assert isinstance(refused, BudgetRefused) and read_again == 1


def test_a_redis_restarted_empty_gets_back_what_the_instances_remember(tmp_path, redis_server):
    route, (a, b) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 40, "per": "1h"}])

    async def scenario():
        assert status(await outcome(a, route, "jo")) == 200
        a.charge([bucket("jo")], 45)  # spent
        await synced(a, 1)
        redis_server.kill()
        redis_server.start()  # empty
        await synced(a)  # a remembers jo's bucket: it puts it back
        return await outcome(b, route, "jo")  # b never saw jo: reads the restored bucket

    assert isinstance(running([a, b], scenario), BudgetRefused)


def test_a_burst_on_a_key_every_instance_follows_never_admits_past_the_limit(tmp_path, redis_server):
    """Each instance follows the key and has synced since: a burst spread over all of them is
    decided from their leases and by Redis, never past the limit (the requests a lease holds are
    counted in Redis when it is granted); once the leases left unused went back, what is left is
    admitted, exactly."""
    route, gates = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 10**9, "requests": 30,
                                                       "per": "1h"}], count=4)

    async def scenario():
        for gate in gates:
            assert status(await outcome(gate, route, "eve")) == 200
        for gate in gates:
            await synced(gate)
        burst = await asyncio.gather(*[outcome(gates[i % 4], route, "eve") for i in range(80)])
        await asyncio.sleep(20 * SYNC_S)  # the leases left unused go back
        rest = []
        for gate in gates:
            while status(result := await outcome(gate, route, "eve")) == 200:
                rest.append(result)
        return [status(r) for r in burst], len(rest)

    statuses, rest = running(gates, scenario)
    assert statuses.count(200) + statuses.count(429) == 80
    assert statuses.count(200) <= 30 - 4  # never past the limit, in the burst ...
    assert statuses.count(200) + rest == 30 - 4  # ... nor after it, and none held back for good


def test_a_lease_left_unused_goes_back_for_the_other_instances(tmp_path, redis_server):
    route, (a, b) = instances(tmp_path, redis_server, [{"name": "everyone", "tokens": 10**9, "requests": 40,
                                                        "per": "1h"}])

    async def scenario():
        for _ in range(30):  # a steady flow on a: it holds a lease for its pace
            assert status(await outcome(a, route, "flo")) == 200
            await asyncio.sleep(SYNC_S / 4)
        held = a._mirror[bucket("flo")][4]
        admitted_on_b = 0
        for _ in range(500):  # then b asks for what is left, until it got it all: a gives its lease back
            admitted_on_b += status(await outcome(b, route, "flo")) == 200
            if admitted_on_b == 10:
                break
            await asyncio.sleep(0.01)
        return held, admitted_on_b, status(await outcome(b, route, "flo")), status(await outcome(a, route, "flo"))

    held, admitted_on_b, b_after, a_after = running([a, b], scenario)
    assert held >= 1  # a held requests b could not have meanwhile
    assert admitted_on_b == 10 and (b_after, a_after) == (429, 429)  # exactly the 40, none more
