"""What token budgets (LLMTokenRateLimit) cost, two ways:

- under load (`scripts/bench --budgets`): CPU per request of the gateway's Python process (ext_proc,
  access log, Redis sync) and of all its processes, wrk at 16 connections for a fixed time per
  variant, alternating: no budget, a budget matching every request kept in process, the same
  through Redis (far from its limit: admitted from memory; the requests that waited for Redis
  are counted and printed, a handful); requests per second against bare Envoy as a ratio; and
  the overshoot bound between two and four instances on one Redis, for keys new to every
  instance and keys each instance follows.
- the hook alone, in process (`python -m benchmarks budget-hook`, or `python
  scripts/budget_cpu.py`): the ext_proc's two messages (headers, body) and the access-log entry
  of one request, with and without a budget matching every request, no Envoy, no network; the
  best of several repeats (the machine is shared).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from .contenders import HOST, MESSAGES, Contender, Stage, start_bare, start_gateway, start_redis, write_script
from .measure import Processes, best_us
from .rounds import cpu_us_per, run_rounds, under_wrk, warm_up

# --- under load -------------------------------------------------------------------------------

BUDGET_YAML = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: bench}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules:
  - name: bound
    matches:
    - headers: {x-bench: {exact: bound}}
    tokens: BOUND_TOKENS
    per: 1h
  - name: counted
    matches:
    - headers: {x-bench: {exact: counted}}
    tokens: 1000000000000
    requests: BOUND_REQUESTS
    per: 1h
  - name: everyone
    tokens: 1000000000000
    per: 1h
"""
BOUND_TOKENS = 70  # ten answers of the fake's 7 tokens
BOUND_REQUESTS = 10


def under_load(rounds: int, seconds: int, out: Path) -> int:
    """The budgets variant of scripts/bench (see the module's docstring); JSON to `out`."""
    with Stage("llm-gateway-bench-budgets-") as stage:
        redis_url, redis = start_redis(stage)
        contenders: dict[str, Contender] = {"bare": start_bare(stage)}
        budget_yaml = BUDGET_YAML.replace("BOUND_TOKENS", str(BOUND_TOKENS)).replace("BOUND_REQUESTS",
                                                                                    str(BOUND_REQUESTS))
        for name, budget, url in (("none", False, None), ("local", True, None), ("redis", True, redis_url),
                                  ("redis-b", True, redis_url), ("redis-c", True, redis_url),
                                  ("redis-d", True, redis_url)):
            extra = [("10-budget.yaml", budget_yaml)] if budget else []
            contenders[name] = start_gateway(stage, name, stage.config_dir(f"config-{name}", *extra), metrics=True,
                                             options=["--redis", url] if url else [])
        for c in contenders.values():
            stage.wait_serving(c)
        write_script(stage, list(contenders.values()), {"x-user-id": "bench-user"})
        measured = {n: contenders[n] for n in ("bare", "none", "local", "redis")}
        # every process that serves a variant: its Envoy too, and Redis for the Redis one
        redis_gateway = measured["redis"].processes
        redis_gateway["all"] = Processes(redis_gateway["all"].pids + redis.pids)
        warm_up(measured.values())

        def line(r: int, c: Contender, _connections: int, done: list[dict]) -> str:
            return f"round {r} {c.name:6s}: {done[-1]['rps']:8.0f} req/s  errors {done[-1]['errors']}"

        waited_before = redis_waits(contenders["redis"])
        runs = {n: by_c[16] for n, by_c in run_rounds(measured, rounds, under_wrk(seconds), (16,), line=line).items()}
        waited = {k: v - waited_before[k] for k, v in redis_waits(contenders["redis"]).items()}
        instances = [contenders[n].port for n in ("redis", "redis-b", "redis-c", "redis-d")]
        bound = {f"{n} instances, {kind} keys": measure_bound(instances[:n], 20, kind == "followed")
                 for n in (2, 4) for kind in ("new", "followed")}
        variants = ["none", "local", "redis"]
        rps = {n: [r["rps"] for r in done] for n, done in runs.items()}
        # each round's requests/s over bare Envoy's in the same round: their spread is the noise
        # a difference between the variants must exceed to mean anything
        by_round = {n: [r / b for r, b in zip(rps[n], rps["bare"], strict=True)] for n in variants}
        all_us = {n: cpu_us_per(done, "all") for n, done in runs.items()}
        figures = {
            "cpu_us_per_request": {n: cpu_us_per(runs[n], "ext_proc") for n in variants},
            "cpu_us_per_request_all_processes": all_us,
            # what a budget costs in all: the variant's CPU per request over the no-budget one's
            "cpu_over_none": {n: all_us[n] / all_us["none"] for n in variants},
            "requests_measured": {n: sum(r["requests"] for r in runs[n]) for n in variants},
            "rps_over_bare": {n: statistics.median(rps[n]) / statistics.median(rps["bare"]) for n in variants},
            "rps_over_bare_by_round": by_round,
            # the Redis variant under load: requests that waited for Redis, and the round trips made
            # for them (its key is far from its limit: only its first requests, before an answer's
            # usage is known)
            "redis_admissions_under_load": waited,
            "bound": bound,
        }
        print(json.dumps(figures, indent=2))
        for n in variants:
            print(f"{n:6s} req/s over bare {figures['rps_over_bare'][n]:.3f} (rounds {min(by_round[n]):.3f}-"
                  f"{max(by_round[n]):.3f}), CPU per request {figures['cpu_us_per_request'][n]:.0f} us in the "
                  f"ext_proc, {all_us[n]:.0f} us in all ({figures['cpu_over_none'][n]:.3f} of no budget's)")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (out / f"bench-budgets-{stamp}.json").write_text(json.dumps(figures, indent=2))
        return 0


def _status(conn: http.client.HTTPConnection, headers: dict) -> tuple[int, float]:
    body = json.dumps({"messages": MESSAGES}).encode()
    conn.request("POST", "/", body=body, headers={"Host": HOST, "Content-Type": "application/json", **headers})
    resp = conn.getresponse()
    resp.read()
    return resp.status, time.monotonic()


def redis_waits(contender: Contender) -> dict[str, float]:
    """What the gateway's admissions waited for Redis so far (from its /metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{contender.metrics_port}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    wanted = {"llm_gateway_budget_redis_admissions_total": "requests",
              "llm_gateway_budget_admission_round_trips_total": "round_trips"}
    found = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name in wanted:
                found[wanted[sample.name]] += sample.value
    return found


def measure_bound(ports: list[int], trials: int, followed: bool) -> dict:
    """Overshoot across instances on one Redis: one client goes round them with a fresh key per
    trial until every one refuses, on a budget of BOUND_TOKENS (the fake's answers cost 7 tokens
    each), then on one of BOUND_REQUESTS. Keys new to every instance, or (`followed`) keys each
    instance admitted once before (so each decides from memory while far from the limit). Tokens
    and requests admitted beyond the budget, and the time from the answer that spent the token
    budget to the last admission on any instance."""
    over_tokens, over_requests, lag_s = [], [], []
    conns = [http.client.HTTPConnection("127.0.0.1", p, timeout=30) for p in ports]
    for trial in range(trials):
        for plan, limit in (("bound", BOUND_TOKENS), ("counted", BOUND_REQUESTS)):
            headers = {"x-user-id": f"bound-{trial}-{os.urandom(4).hex()}", "x-bench": plan}
            admitted = 0
            if followed:
                for conn in conns:
                    admitted += _status(conn, headers)[0] == 200
                time.sleep(0.25)  # the instances have synced: from here each decides from memory while far
            spent_at, last_ok, refused = None, None, [False] * len(conns)
            i = 0
            while not all(refused) and i < 10_000:
                status, at = _status(conns[i % len(conns)], headers)
                if status == 200:
                    admitted += 1
                    last_ok = at
                    if spent_at is None and admitted * (7 if plan == "bound" else 1) >= limit:
                        spent_at = at
                elif status == 429:
                    refused[i % len(conns)] = True
                i += 1
            if plan == "bound":
                over_tokens.append(admitted * 7 - BOUND_TOKENS)
                lag_s.append(max(0.0, (last_ok or 0) - (spent_at or last_ok or 0)))
            else:
                over_requests.append(admitted - BOUND_REQUESTS)
    for conn in conns:
        conn.close()
    return {"trials": trials,
            "overshoot_tokens": {"median": statistics.median(over_tokens), "max": max(over_tokens)},
            "overshoot_requests": {"median": statistics.median(over_requests), "max": max(over_requests)},
            "lag_s": {"median": statistics.median(lag_s), "max": max(lag_s)}}


# --- the hook alone, in process -----------------------------------------------------------------

PROVIDER = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: p}
spec:
  host: dashscope.aliyuncs.com
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-bench}}}
"""
BUDGET = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: everyone}
spec:
  host: dashscope.aliyuncs.com
  key: {header: x-user-id}
  rules: [{name: all, tokens: 1000000000000, per: 1h}]
"""
N = 5000  # requests per timed loop


def hook_messages() -> tuple[bytes, bytes]:
    """A request's two ext_proc messages: headers (with the budget's key), and the whole body."""
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    hdrs = {":method": "POST", ":authority": "dashscope.aliyuncs.com", ":path": "/", "content-type": "application/json",
            "x-user-id": "bench-user", "user-agent": "curl/8", "accept": "*/*"}
    head = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in hdrs.items()])))
    body = pb.ProcessingRequest(request_body=pb.HttpBody(
        body=b'{"messages": [{"role": "user", "content": "Please introduce yourself."}]}', end_of_stream=True))
    return head.SerializeToString(), body.SerializeToString()


def hook_log_batch(metadata, n: int) -> bytes:
    """`n` access-log entries of answered requests with usage, carrying the decision's `metadata`."""
    from envoy.service.accesslog.v3 import als_pb2

    from extproc.protocol import METADATA_NAMESPACE

    msg = als_pb2.StreamAccessLogsMessage()
    for _ in range(n):
        e = msg.http_logs.log_entry.add()
        e.response.response_code.value = 200
        e.response.response_code_details = "via_upstream"
        e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].CopyFrom(metadata)
        fields = e.common_properties.metadata.filter_metadata[METADATA_NAMESPACE].fields
        fields["prompt_tokens"].number_value, fields["completion_tokens"].number_value = 5, 2
        fields["total_tokens"].number_value = 7
    return msg.SerializeToString()


def hook_us(with_budget: bool, redis_url: str | None = None) -> tuple[float, float]:
    """CPU µs per request of the ext_proc's messages, and of its access-log entry. With
    `redis_url`: the budget shared through that Redis, its key followed and far from its limit
    (admitted from memory; the first requests, which wait for Redis, are not timed)."""
    from prometheus_client import CollectorRegistry

    from extproc.config.file_source import load_config
    from extproc.dataplane.accesslog_receiver import AccessLogReceiver
    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.budget_gate import BudgetGate
    from extproc.policy.table import TableHolder
    from extproc.telemetry.metrics import GatewayMetrics

    with tempfile.TemporaryDirectory() as work:
        config = Path(work) / "c.yaml"
        config.write_text(PROVIDER + (BUDGET if with_budget else ""))
        holder = TableHolder(load_config([config], {}).table)
    gate = BudgetGate(CollectorRegistry(), lambda: holder.table, redis_url)
    processor = ExternalProcessor(holder, budgets=gate)
    receiver = AccessLogReceiver(GatewayMetrics(), gate)
    head, body = hook_messages()

    def exchanges() -> int:
        for _ in range(N):
            ex = processor.exchange()
            ex.on_message(head)
            ex.on_message(body)
        return N

    def timed(batch: bytes) -> tuple[float, float]:
        def logs() -> int:
            for _ in range(N // 100):
                receiver.on_message(batch)
            return N

        return (best_us(exchanges, repeats=7, clock=time.process_time),
                best_us(logs, repeats=7, clock=time.process_time))

    if redis_url is None:
        return timed(_first_batch(processor, head, body, None))

    async def shared() -> tuple[float, float]:
        await gate.start()
        try:
            batch = b""
            for _ in range(100):  # until its key is followed, with an answer's usage known: from memory
                ex = processor.exchange()
                waited = ex.on_message(head)[0]
                if not isinstance(waited, list):
                    await _answered(waited)
                elif batch:
                    break
                batch = _first_batch(processor, head, body, ex)
                receiver.on_message(batch)
                await asyncio.sleep(0.1)
            else:
                raise RuntimeError("the budget's key never came to be admitted from memory")
            return timed(batch)
        finally:
            await gate.stop()

    return asyncio.run(shared())


def _first_batch(processor, head: bytes, body: bytes, ex) -> bytes:
    """An access-log batch for the request `ex` (or a new exchange) answers, its headers sent."""
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.protocol import METADATA_NAMESPACE

    if ex is None:
        ex = processor.exchange()
        ex.on_message(head)
    first = pb.ProcessingResponse.FromString(ex.on_message(body)[0][0])
    return hook_log_batch(first.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value, 100)


async def _answered(deferred) -> None:
    """Until a deferred ext_proc answer is given (a request waiting for Redis)."""
    done = asyncio.get_running_loop().create_future()
    ready = deferred.bind(lambda answers, over, failure: done.done() or done.set_result(None))
    if ready is None:
        await asyncio.wait_for(done, 5)


def hook_main(argv: list[str]) -> int:
    """`python -m benchmarks budget-hook`: one line, without a budget / with one (in process, and
    shared through a throwaway Redis)."""
    argparse.ArgumentParser(prog="python -m benchmarks budget-hook", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    (e0, a0), (e1, a1) = hook_us(False), hook_us(True)
    print(f"CPU per request, without a budget / with one matching every request: ext_proc {e0:.1f} / {e1:.1f} us "
          f"(+{e1 - e0:.1f}), access log {a0:.1f} / {a1:.1f} us (+{a1 - a0:.1f}), "
          f"total {e0 + a0:.1f} / {e1 + a1:.1f} us (+{e1 + a1 - e0 - a0:.1f})")
    with Stage("llm-gateway-bench-hook-") as stage:
        redis_url, _ = start_redis(stage)
        _wait_for_redis(redis_url)
        e2, a2 = hook_us(True, redis_url)
    print(f"the same budget shared through Redis, far from its limit: ext_proc {e2:.1f} us (+{e2 - e0:.1f}), "
          f"access log {a2:.1f} us (+{a2 - a0:.1f}), total {e2 + a2:.1f} us (+{e2 + a2 - e0 - a0:.1f})")
    return 0


def _wait_for_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=1, socket_connect_timeout=1)
    for _ in range(100):
        try:
            client.ping()
            return
        except redis.RedisError:
            time.sleep(0.1)
    raise RuntimeError(f"no Redis at {url}")
