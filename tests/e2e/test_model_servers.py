"""In-cluster model servers behind an LLMRoute (docs/in-cluster-models.md): the real Envoy,
several simulated vLLM-like servers each on its own loopback address, the endpoint picked per
request from their scraped load (files mode: the pool's endpoints annotation)."""

from __future__ import annotations

import concurrent.futures
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.demo.model_server import ModelServer, ModelServerFarm
from support.helpers import provider_yaml, wait_until

CHAT = "/v1/chat/completions"

HOST = "qwen.internal"
DASHSCOPE = "dashscope.aliyuncs.com"
EQUAL = {"waiting": 0, "running": 0, "kv": 0.1}


@pytest.fixture
def farm():
    with ModelServerFarm(3) as servers:
        yield servers


def pool_yaml(servers: list[ModelServer] | None, name: str = "qwen") -> str:
    endpoints = ", ".join(s.address for s in servers or [])
    return f"""apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: {name}
  annotations:
    llm-gateway.dev/endpoints: "{endpoints}"
spec:
  selector:
    matchLabels: {{app: {name}}}
  targetPorts: [{{number: 8000}}]
  endpointPickerRef: {{name: {name}-epp, port: {{number: 9002}}}}
---
"""


def route_yaml(backend_refs: str, extra: str = "") -> str:
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: local-models
spec:
  host: {HOST}
  rules:
  - name: main
    backendRefs:
{backend_refs}{extra}"""


POOL_REF = "    - backendRef: {group: inference.networking.k8s.io, kind: InferencePool, name: qwen}\n"
RETRIES = "    retries: {attempts: 1, retryOn: [connect-failure, reset, 5xx, 429]}\n"


def write(tmp_path: Path, *docs: str) -> Path:
    config = tmp_path / "models-config"
    config.mkdir(exist_ok=True)
    (config / "all.yaml").write_text("".join(docs))
    return config


def chat(gw, content: str = "hello", model: str = "base-model", **extra):
    return gw.request(HOST, {"model": model, "messages": [{"role": "user", "content": content}], **extra}, path=CHAT)


def served_by(response) -> str:
    assert response.status == 200, response.body
    return response.headers["x-model-server"]


def report(farm: ModelServerFarm, **loads: dict) -> None:
    for server in farm.servers:
        server.reported = loads.get(server.name, EQUAL)


def wait_scraped(gw, farm: ModelServerFarm, waiting: dict[str, float] | None = None) -> None:
    """Until the gateway's picker has fresh loads of every server (as reported, where given)."""
    def fresh() -> bool:
        metrics = gw.metrics()
        for server in farm.servers:
            labels = frozenset({"pool": "default/qwen", "endpoint": server.address}.items())
            if metrics.get(("llm_gateway_endpoint_stale", labels)) != 0.0:
                return False
            if waiting and server.name in waiting and \
                    metrics.get(("llm_gateway_endpoint_queue", labels)) != waiting[server.name]:
                return False
        return True
    wait_until(fresh, 20, lambda: f"loads not scraped: {gw.metrics()}")


def test_weights_mix_pool_and_provider_and_each_is_rewritten_as_its_own(gateway_factory, farm, tmp_path, keys,
                                                                       fresh_providers):
    report(farm)
    refs = ("    - backendRef: {group: inference.networking.k8s.io, kind: InferencePool, name: qwen,"
            " model: qwen2-7b, path: /v1/chat/completions}\n      weight: 3\n"
            f"    - providerHost: {DASHSCOPE}\n      weight: 1\n")
    config = write(tmp_path, pool_yaml(farm.servers),
                   provider_yaml("dashscope", DASHSCOPE, "qwen-max", keys["YOUR_DASHSCOPE_API_KEY"]) + "---\n",
                   route_yaml(refs))
    gw = gateway_factory(config)
    answers = [chat(gw, f"q{i}") for i in range(40)]
    assert all(a.status == 200 for a in answers), [a.body for a in answers if a.status != 200]
    to_pool = [a for a in answers if "x-model-server" in a.headers]
    to_provider = len(answers) - len(to_pool)
    assert 15 <= len(to_pool) <= 39 and to_provider >= 1, (len(to_pool), to_provider)  # 3:1
    seen = [s for server in farm.servers for s in server.seen]
    assert len(seen) == len(to_pool)
    # a pool is sent the model its backendRef names, at its path, and never a key (it names none)
    assert {s.model for s in seen} == {"qwen2-7b"} and {s.path for s in seen} == {"/v1/chat/completions"}
    assert all("authorization" not in s.headers for s in seen)
    dashscope = fresh_providers[DASHSCOPE]
    assert len(dashscope.requests) == to_provider
    assert all(r.headers.get("authorization") == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}" for r in dashscope.requests)
    # the picked endpoint is in the access log
    addresses = {s.address for s in farm.servers}
    wait_until(lambda: len([e for e in gw.access_entries() if e.get("upstream_host") in addresses]) == len(to_pool),
               10, lambda: f"{gw.access_entries()[-3:]}")
    # every request the picker counted in flight is counted finished again (from the access log)
    def values(metric: str) -> list[float]:
        return [v for (name, _), v in gw.metrics().items() if name == metric]
    wait_until(lambda: all(v == 0 for v in values("llm_gateway_endpoint_outstanding")), 10, lambda: f"{gw.metrics()}")
    assert sum(values("llm_gateway_endpoint_picked_total")) == len(to_pool)


def test_a_client_cannot_choose_the_endpoint(gateway_factory, farm, tmp_path):
    report(farm, ms0={"waiting": 30, "running": 4, "kv": 0.9})
    gw = gateway_factory(write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF)))
    wait_scraped(gw, farm, {"ms0": 30})
    header = "x-llm-gateway-endpoint-llm_provider_qwen_default_inferencepool"
    for _ in range(6):
        answer = gw.request(HOST, {"model": "base-model", "messages": [{"role": "user", "content": "x"}]}, path=CHAT,
                            headers={header: farm.servers[0].address})
        assert served_by(answer) != "ms0"


def test_picking_follows_queue_and_kv_load(gateway_factory, farm, tmp_path):
    report(farm, ms0={"waiting": 12, "running": 4, "kv": 0.3}, ms1={"waiting": 0, "running": 1, "kv": 0.2},
           ms2={"waiting": 6, "running": 4, "kv": 0.2})
    gw = gateway_factory(write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF)))
    wait_scraped(gw, farm, {"ms0": 12, "ms1": 0})
    assert {served_by(chat(gw, f"q{i}")) for i in range(8)} == {"ms1"}  # the shortest queue
    # the queues even out: the KV cache decides
    report(farm, ms0={"waiting": 0, "running": 2, "kv": 0.95}, ms1={"waiting": 0, "running": 2, "kv": 0.7},
           ms2={"waiting": 0, "running": 2, "kv": 0.15})
    wait_scraped(gw, farm, {"ms0": 0, "ms1": 0, "ms2": 0})
    wait_until(lambda: gw.metrics().get(("llm_gateway_endpoint_kv_cache_usage", frozenset(
        {"pool": "default/qwen", "endpoint": farm.servers[2].address}.items()))) == 0.15, 10)
    served = [served_by(chat(gw, f"r{i}")) for i in range(8)]
    # the emptiest cache, but for what was sent there since its last scrape; never the full one
    assert "ms0" not in served and served.count("ms2") > served.count("ms1"), served


def test_prefix_affinity_unless_overloaded(gateway_factory, farm, tmp_path):
    report(farm)
    gw = gateway_factory(write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF)))
    wait_scraped(gw, farm)
    document = "The contract between the parties says, in clause after clause, many things. " * 60  # ~4.6 KB
    first = served_by(chat(gw, document + "Question 0?"))
    later = [served_by(chat(gw, document + f"Question {i}?")) for i in range(1, 7)]
    assert set(later) == {first}, (first, later)  # the server whose cache holds the document
    owner = next(s for s in farm.servers if s.name == first)
    assert all(s.cached_blocks > 0 for s in owner.seen[1:])  # its prefix cache was hit
    # other prompts spread as usual (equal loads)
    assert len({served_by(chat(gw, f"unrelated {i}")) for i in range(6)}) > 1
    # the owner is overloaded: the document goes elsewhere
    report(farm, **{first: {"waiting": 20, "running": 4, "kv": 0.5}})
    wait_scraped(gw, farm, {first: 20})
    assert first not in {served_by(chat(gw, document + f"Question {i}?")) for i in range(10, 14)}


def test_lora_affinity(gateway_factory, farm, tmp_path):
    report(farm, ms0={**EQUAL, "loras": ""}, ms1={**EQUAL, "loras": ""}, ms2={**EQUAL, "loras": "sql-lora,chat-lora"})
    gw = gateway_factory(write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF)))
    wait_scraped(gw, farm)
    assert {served_by(chat(gw, f"select {i}", model="sql-lora")) for i in range(6)} == {"ms2"}
    assert len({served_by(chat(gw, f"base {i}")) for i in range(6)}) > 1  # the base model: anywhere


@pytest.mark.parametrize("fault", ["503", "reset"])
def test_a_dying_endpoint_is_retried_on_another_and_ejected(gateway_factory, farm, tmp_path, fault):
    dying = farm.servers[0]
    report(farm, ms0={"waiting": 0, "running": 0, "kv": 0.0}, ms1={"waiting": 3, "running": 4, "kv": 0.5},
           ms2={"waiting": 3, "running": 4, "kv": 0.5})  # the dying one looks best
    gw = gateway_factory(write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF, RETRIES)))
    wait_scraped(gw, farm, {"ms0": 0, "ms1": 3})
    if fault == "503":
        dying.fail_status = 503
    else:
        dying.reset = True
    labels = frozenset({"pool": "default/qwen", "endpoint": dying.address}.items())
    answers = []
    for i in range(4):  # each answered by another server, before any byte reached the client
        answers.append(chat(gw, f"q{i}"))
        if gw.metrics().get(("llm_gateway_endpoint_ejected", labels)) == 1.0:
            break
    assert all(served_by(a) != "ms0" for a in answers)
    wait_until(lambda: gw.metrics().get(("llm_gateway_endpoint_ejected", labels)) == 1.0, 10,
               lambda: f"not ejected: {gw.metrics()}")
    failed = sum(v for (name, lab), v in gw.metrics().items()
                 if name == "llm_gateway_endpoint_failed_attempts_total" and ("endpoint", dying.address) in lab)
    assert failed >= 2
    tried = len(dying.seen) if fault == "503" else None
    assert {served_by(chat(gw, f"after {i}")) for i in range(6)} <= {"ms1", "ms2"}
    if tried is not None:
        assert len(dying.seen) == tried  # ejected: not tried any more


def test_stale_metrics_fall_back_to_least_outstanding(gateway_factory, farm, tmp_path):
    for server in farm.servers:
        server.metrics_mode = "garbage"
    farm.servers[1].metrics_mode = "huge"
    farm.servers[2].metrics_mode = "slow"
    gw = gateway_factory(write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF)))
    for server in farm.servers:
        server.spec.decode_s = 0.05  # 16 tokens: 0.8 s per request, so they overlap
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(lambda i=i: served_by(chat(gw, f"q{i}"))) for i in range(6)]
        served = [f.result() for f in futures]
    # none in flight is sent where another has fewer: two each
    assert sorted(served.count(s.name) for s in farm.servers) == [2, 2, 2], served
    metrics = gw.metrics()
    for server in farm.servers:
        labels = frozenset({"pool": "default/qwen", "endpoint": server.address}.items())
        assert metrics[("llm_gateway_endpoint_stale", labels)] == 1.0
    # one healthy again: fresh while the slow one stays stale
    farm.servers[0].metrics_mode = "ok"
    wait_until(lambda: gw.metrics().get(("llm_gateway_endpoint_stale", frozenset(
        {"pool": "default/qwen", "endpoint": farm.servers[0].address}.items()))) == 0.0, 10)


def test_a_pool_without_ready_endpoints_answers_503_or_fails_over(gateway_factory, tmp_path, keys, fresh_providers):
    config = write(tmp_path, pool_yaml([]), route_yaml(POOL_REF))
    gw = gateway_factory(config)
    answer = chat(gw)
    assert answer.status == 503 and answer.json()["error"]["code"] == "no_ready_endpoint", answer.body
    assert answer.headers.get("retry-after") == "1"
    # the rule says where to go instead
    fallback = f"    fallbackRefs:\n    - providerHost: {DASHSCOPE}\n" + RETRIES
    (config / "all.yaml").write_text(pool_yaml([]) + provider_yaml("dashscope", DASHSCOPE, "qwen-max",
                                                                   keys["YOUR_DASHSCOPE_API_KEY"]) + "---\n"
                                     + route_yaml(POOL_REF, fallback))
    wait_until(lambda: chat(gw).status == 200, 15, lambda: gw.log()[-2000:])
    assert fresh_providers[DASHSCOPE].requests[-1].body["model"] == "qwen-max"


def test_route_shows_the_candidates_and_their_scores(farm, tmp_path):
    report(farm, ms0={"waiting": 9, "running": 4, "kv": 0.5}, ms1={"waiting": 0, "running": 1, "kv": 0.1},
           ms2={**EQUAL, "loras": "sql-lora"})
    farm.servers[2].metrics_mode = "garbage"
    config = write(tmp_path, pool_yaml(farm.servers), route_yaml(POOL_REF))
    out = subprocess.run([sys.executable, "-m", "extproc", "route", "--config", str(config), "--host", HOST],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "pool InferencePool default/qwen (http): 3 ready endpoints" in lines
    ranked = [line.split()[0] for line in lines if line.startswith("    ")]
    # the short queue first; a server known to be overloaded after one whose load is not known
    assert ranked == [farm.servers[1].address, farm.servers[2].address, farm.servers[0].address], out.stdout
    assert "queue=1 kv=0.10" in out.stdout and "queue=13 kv=0.50 overloaded" in out.stdout
    assert "(metrics: ValueError: no load metrics in the answer)" in out.stdout
