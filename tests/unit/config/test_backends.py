"""LLMRoute backendRefs to Services and InferencePools: what is refused and where it is said,
the pools and their endpoints, and failover through a pool (docs/in-cluster-models.md)."""

from __future__ import annotations

import pytest

from extproc.config.backends import backend_of, parse_endpoints, pool_endpoints, slice_endpoints
from extproc.config.compile import compile_config
from extproc.config.loader import parse_object
from extproc.policy.failover import full_order
from extproc.protocol import failover_cluster, retry_cluster
from support.manifests import DASHSCOPE, provider, route

POOL_REF = {"group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "qwen"}


def pool(name="qwen", namespace="team", endpoints="10.0.0.1:8000, 10.0.0.2:8000", **spec) -> dict:
    meta = {"name": name, "namespace": namespace}
    if endpoints is not None:
        meta["annotations"] = {"llm-gateway.dev/endpoints": endpoints}
    return {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool", "metadata": meta,
            "spec": {"selector": {"matchLabels": {"app": name}}, "targetPorts": [{"number": 8000}], **spec}}


def service(name="vllm", namespace="team", ports=({"name": "http", "port": 80},), endpoints="10.0.1.1:8000") -> dict:
    meta = {"name": name, "namespace": namespace, "annotations": {"llm-gateway.dev/endpoints": endpoints}}
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": {"ports": list(ports)}}


def compiled(backend_refs: list[dict], backends: list[dict], *docs: dict, fallback_refs=None, retries=None,
             endpoints=None):
    rule: dict = {"name": "main", "backendRefs": backend_refs}
    if fallback_refs is not None:
        rule["fallbackRefs"] = fallback_refs
    if retries is not None:
        rule["retries"] = retries
    loaded = []
    for doc in (*docs, route("local", "chat.internal", [rule], namespace="team")):
        obj, problems = parse_object(doc, "config.yaml", "1", {})
        assert obj is not None, problems
        loaded.append(obj)
    found = {(b["kind"], b["metadata"]["namespace"], b["metadata"]["name"]): backend_of(b) for b in backends}
    return compile_config(loaded, backends=found, endpoints=endpoints)


@pytest.mark.parametrize(("ref", "message"), [
    ({"providerHost": DASHSCOPE, "backendRef": POOL_REF}, "set providerHost or backendRef, not both"),
    ({"weight": 1}, "set providerHost (an LLMProvider's host) or backendRef"),
    ({"backendRef": {**POOL_REF, "group": ""}}, "group of a InferencePool is 'inference.networking.k8s.io'"),
    ({"backendRef": {"kind": "Deployment", "name": "x"}}, "Input should be 'Service' or 'InferencePool'"),
    ({"backendRef": {"kind": "Service", "name": "x", "port": 0}}, "greater than or equal to 1"),
])
def test_a_malformed_backend_ref_is_refused_naming_its_field(ref, message):
    doc = route("r", "chat.internal", [{"backendRefs": [ref]}])
    obj, problems = parse_object(doc, "config.yaml", "1", {})
    assert obj is None
    assert any(message in p.message and p.field.startswith("spec.rules[0].backendRefs[0]") for p in problems), problems


@pytest.mark.parametrize(("ref", "backends", "field", "reason"), [
    ({**POOL_REF, "name": "missing"}, [pool()], "backendRefs[0].backendRef.name", "BackendNotFound"),
    ({**POOL_REF, "namespace": "other"}, [pool(namespace="other")], "backendRefs[0].backendRef.namespace",
     "RefNotPermitted"),
    ({**POOL_REF, "port": 9000}, [pool()], "backendRefs[0].backendRef.port", "InvalidBackendRef"),
    ({"kind": "Service", "name": "vllm"}, [service(ports=({"name": "a", "port": 80}, {"name": "b", "port": 81}))],
     "backendRefs[0].backendRef.port", "InvalidBackendRef"),
    ({"kind": "Service", "name": "vllm", "port": 8080}, [service()], "backendRefs[0].backendRef.port",
     "InvalidBackendRef"),
    (POOL_REF, [pool(endpoints="not-an-address")], "backendRefs[0].backendRef", "InvalidBackend"),
])
def test_a_bad_backend_ref_is_an_error_of_the_route_naming_the_field(ref, backends, field, reason):
    result = compiled([{"backendRef": ref}], backends)
    (problem,) = [p for p in result.problems if p.severity == "error"]
    assert problem.obj == "LLMRoute team/local" and problem.field == f"spec.rules[0].{field}"
    assert problem.reason == reason
    assert not result.table.routes  # the route is left out


def test_pools_and_providers_mix_by_weight_and_each_target_is_rewritten_as_its_own():
    result = compiled([{"backendRef": {**POOL_REF, "model": "qwen2-7b", "path": "/v1/chat/completions"},
                        "weight": 90},
                       {"backendRef": {"kind": "Service", "name": "vllm", "tls": True}, "weight": 5},
                       {"providerHost": DASHSCOPE, "weight": 5}],
                      [pool(), service()], provider("dashscope", DASHSCOPE, "qwen-max", namespace="team",
                                                     api_key="sk-x"))
    assert not [p for p in result.problems if p.severity == "error"], result.problems
    table = result.table
    rule = table.routes["chat.internal"].rules[0]
    in_pool, by_service, at_provider = rule.targets
    assert rule.cumulative_weights == (90, 95, 100)
    assert (in_pool.pool, in_pool.model, in_pool.api_key, in_pool.provider) == \
        ("qwen.team.inferencepool", "qwen2-7b", None, "team/qwen")
    assert by_service.pool == "vllm.team.svc" and by_service.model is None  # the client's model
    assert at_provider.pool is None and at_provider.api_key == "sk-x"
    assert table.pools["qwen.team.inferencepool"].endpoints == ("10.0.0.1:8000", "10.0.0.2:8000")
    assert table.pools["vllm.team.svc"].protocol == "https"
    assert set(table.clusters) == {"qwen.team.inferencepool", "vllm.team.svc", DASHSCOPE}


def test_h2c_where_the_app_protocol_says_so():
    result = compiled([{"backendRef": POOL_REF}], [pool(appProtocol="kubernetes.io/h2c")])
    assert result.table.pools["qwen.team.inferencepool"].protocol == "h2c"


def test_kubernetes_endpoints_replace_the_annotation_and_an_empty_pool_is_skipped_by_failover():
    result = compiled([{"backendRef": POOL_REF}], [pool(endpoints=None)], provider("d", DASHSCOPE, namespace="team"),
                      fallback_refs=[{"providerHost": DASHSCOPE}], retries={"attempts": 2},
                      endpoints={("InferencePool", "team", "qwen"): ()})
    table = result.table
    assert table.empty_pools == {"qwen.team.inferencepool"}
    order = table.routes["chat.internal"].rules[0].failover.orders[0]
    # the pool twice (its best endpoint, then another), then the fallback
    assert [t.cluster for t in order] == [failover_cluster("qwen.team.inferencepool"),
                                          retry_cluster("qwen.team.inferencepool"), failover_cluster(DASHSCOPE)]
    assert table.failover_clusters["qwen.team.inferencepool"] == failover_cluster("qwen.team.inferencepool")
    assert table.cluster_hosts[retry_cluster("qwen.team.inferencepool")] == "qwen.team.inferencepool"
    assert full_order(0, order[:1], (1,), ()) == order[:2]


def test_a_file_pool_without_endpoints_is_a_warning():
    result = compiled([{"backendRef": POOL_REF}], [{**pool(), "metadata": {"name": "qwen", "namespace": "team"}}])
    (warning,) = result.problems
    assert warning.severity == "warning" and "llm-gateway.dev/endpoints" in warning.message


def test_endpoints_from_slices_and_pods_ready_only():
    slices = [{"ports": [{"name": "http", "port": 8000}],
               "endpoints": [{"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
                             {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
                             {"addresses": ["10.1.0.3"]},
                             {"addresses": ["10.1.0.4"], "conditions": {"ready": True, "terminating": True}}]},
              {"ports": [{"name": "metrics", "port": 9090}], "endpoints": [{"addresses": ["10.1.0.9"]}]}]
    assert slice_endpoints(slices, "http") == ("10.1.0.1:8000", "10.1.0.3:8000")
    backend = backend_of(pool(endpoints=None))

    def pod(name, ip, ready=True, labels=None, namespace="team", deleting=False):
        meta = {"name": name, "namespace": namespace, "labels": labels or {"app": "qwen"}}
        if deleting:
            meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
        return {"metadata": meta, "status": {"podIP": ip, "conditions": [
            {"type": "Ready", "status": "True" if ready else "False"}]}}

    pods = [pod("a", "10.2.0.1"), pod("b", "10.2.0.2", ready=False), pod("c", "10.2.0.3", labels={"app": "x"}),
            pod("d", "10.2.0.4", namespace="other"), pod("e", "10.2.0.5", deleting=True), pod("f", "")]
    assert pool_endpoints(backend, pods) == ("10.2.0.1:8000",)


def test_parse_endpoints():
    assert parse_endpoints("10.0.0.2:80, 10.0.0.1:80,,") == ("10.0.0.1:80", "10.0.0.2:80")
    assert parse_endpoints("[::1]:8000") == ("[::1]:8000",)
    assert "not ip:port" in parse_endpoints("vllm.svc:8000")
    assert "no port" in parse_endpoints("10.0.0.1:x") and "is not ip:port" in parse_endpoints("10.0.0.1")


def test_a_pool_as_a_fallback_comes_after_the_providers_twice():
    result = compiled([{"providerHost": DASHSCOPE}], [pool()], provider("d", DASHSCOPE, namespace="team"),
                      fallback_refs=[{"backendRef": POOL_REF}], retries={"attempts": 3})
    assert not [p for p in result.problems if p.severity == "error"], result.problems
    order = result.table.routes["chat.internal"].rules[0].failover.orders[0]
    assert [t.cluster for t in order] == [failover_cluster(DASHSCOPE), failover_cluster("qwen.team.inferencepool"),
                                          retry_cluster("qwen.team.inferencepool")]
    assert set(result.table.clusters) == {DASHSCOPE, "qwen.team.inferencepool"}
