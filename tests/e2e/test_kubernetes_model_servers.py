"""In-cluster model servers from a real kube-apiserver (1.20): Services with their EndpointSlices,
InferencePools with the pods they select, all created as objects (this API server runs no
controllers: pods' readiness is written to their status by the test), and simulated model
servers at the pods' addresses. The candidates follow readiness flips and scaling without a
restart; a bad backendRef gets Accepted=False naming its field (docs/in-cluster-models.md)."""

from __future__ import annotations

import json

import pytest

from extproc.demo.model_server import EQUAL_LOAD, ModelServerFarm
from support.helpers import free_port, wait_until
from support.kube import new_namespace

CHAT = "/v1/chat/completions"
CRD = __import__("pathlib").Path(__file__).parent.parent / "support" / "inferencepool-crd.yaml"


@pytest.fixture
def farm():
    with ModelServerFarm(3, port=free_port()) as servers:  # the pods of one pool share their target port
        for server in servers.servers:
            server.reported = dict(EQUAL_LOAD)
        yield servers


@pytest.fixture
def k8s_gateway(kube, gateway_factory):
    def start():
        return gateway_factory([], extra=["--kubernetes"], env={"KUBECONFIG": kube.env["KUBECONFIG"]})
    return start


def apply(kube, *docs: dict) -> None:
    kube.run("apply", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": list(docs)}))


def route(namespace: str, host: str, refs: list[dict], name: str = "local") -> dict:
    return {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"host": host, "rules": [{"name": "main", "backendRefs": refs}]}}


def pod(kube, namespace: str, name: str, ip: str, ready: bool, labels: dict[str, str]) -> None:
    """A pod object, and its status as a kubelet would write it (its IP, Ready or not)."""
    apply(kube, {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace,
                                                                  "labels": labels},
                 "spec": {"containers": [{"name": "vllm", "image": "vllm/vllm-openai"}]}})
    set_ready(kube, namespace, name, ip, ready)


def set_ready(kube, namespace: str, name: str, ip: str, ready: bool) -> None:
    current = json.loads(kube.run("get", "pod", name, "-n", namespace, "-o", "json").stdout)
    current["status"] = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "conditions": [
        {"type": "Ready", "status": "True" if ready else "False"}]}
    kube.run("replace", "--raw", f"/api/v1/namespaces/{namespace}/pods/{name}/status", "-f", "-",
             stdin=json.dumps(current))


def served(gw, host: str, n: int = 9) -> set[str]:
    found = set()
    for i in range(n):
        answer = gw.request(host, {"model": "base-model", "messages": [{"role": "user", "content": f"q{i}"}]},
                            path=CHAT)
        found.add(answer.headers.get("x-model-server") if answer.status == 200 else answer.status)
    return found


def test_without_the_inferencepool_crd_the_gateway_serves_and_says_what_is_missing(kube, k8s_gateway):
    namespace = new_namespace(kube, "nocrd")
    apply(kube, route(namespace, "pool.internal", [{"backendRef": {
        "group": "inference.networking.k8s.io", "kind": "InferencePool", "name": "qwen"}}]))
    gw = k8s_gateway()
    assert "no InferencePool CRD in the cluster" in gw.log()
    wait_until(lambda: kube.condition("llmroute", "local", namespace).get("status") == "False", 15, gw.log)
    condition = kube.condition("llmroute", "local", namespace)
    assert condition["reason"] == "BackendNotFound"
    assert "spec.rules[0].backendRefs[0].backendRef.name" in condition["message"]


def test_pool_endpoints_follow_pods_and_services_follow_endpoint_slices(kube, k8s_gateway, farm):
    kube.apply(CRD)
    kube.run("wait", "--for", "condition=established", "crd/inferencepools.inference.networking.k8s.io",
             "--timeout", "60s")
    namespace = new_namespace(kube, "models")
    ms0, ms1, ms2 = farm.servers
    port = ms0.port
    labels = {"app": "qwen"}
    apply(kube, {"apiVersion": "inference.networking.k8s.io/v1", "kind": "InferencePool",
                 "metadata": {"name": "qwen", "namespace": namespace},
                 "spec": {"selector": {"matchLabels": labels}, "targetPorts": [{"number": port}],
                          "endpointPickerRef": {"name": "qwen-epp", "port": {"number": 9002}}}},
          route(namespace, "pool.internal", [{"backendRef": {"group": "inference.networking.k8s.io",
                                                              "kind": "InferencePool", "name": "qwen"}}]))
    pod(kube, namespace, "qwen-0", ms0.host, True, labels)
    pod(kube, namespace, "qwen-1", ms1.host, False, labels)  # not ready yet
    pod(kube, namespace, "other", ms2.host, True, {"app": "other"})  # not the pool's
    gw = k8s_gateway()
    wait_until(lambda: served(gw, "pool.internal") == {"ms0"}, 20, gw.log)
    wait_until(lambda: kube.condition("llmroute", "local", namespace).get("status") == "True", 15, gw.log)

    set_ready(kube, namespace, "qwen-1", ms1.host, True)  # readiness flips: a candidate
    wait_until(lambda: served(gw, "pool.internal") == {"ms0", "ms1"}, 20, gw.log)
    pod(kube, namespace, "qwen-2", ms2.host, True, labels)  # scaled up
    wait_until(lambda: served(gw, "pool.internal") == {"ms0", "ms1", "ms2"}, 20, gw.log)
    set_ready(kube, namespace, "qwen-0", ms0.host, False)  # not ready: no more requests
    kube.run("delete", "pod", "qwen-2", "-n", namespace, "--wait=false")  # scaled down
    wait_until(lambda: served(gw, "pool.internal") == {"ms1"}, 20, gw.log)
    set_ready(kube, namespace, "qwen-1", ms1.host, False)  # none ready: 503
    wait_until(lambda: served(gw, "pool.internal", 2) == {503}, 20, gw.log)

    # a Service and its EndpointSlices (v1beta1 on this API server)
    apply(kube, {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "vllm", "namespace": namespace},
                 "spec": {"ports": [{"name": "http", "port": 80, "targetPort": port}], "selector": {"app": "v"}}},
          {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
           "metadata": {"name": "vllm-a", "namespace": namespace, "labels": {"kubernetes.io/service-name": "vllm"}},
           "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
           "endpoints": [{"addresses": [ms0.host], "conditions": {"ready": True}},
                         {"addresses": [ms2.host], "conditions": {"ready": False}}]},
          route(namespace, "svc.internal", [{"backendRef": {"kind": "Service", "name": "vllm", "port": 80}}],
                name="by-service"))
    wait_until(lambda: served(gw, "svc.internal") == {"ms0"}, 20, gw.log)
    apply(kube, {"apiVersion": "discovery.k8s.io/v1beta1", "kind": "EndpointSlice",
                 "metadata": {"name": "vllm-a", "namespace": namespace,
                              "labels": {"kubernetes.io/service-name": "vllm"}},
                 "addressType": "IPv4", "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
                 "endpoints": [{"addresses": [ms0.host], "conditions": {"ready": True}},
                               {"addresses": [ms2.host], "conditions": {"ready": True}}]})
    wait_until(lambda: served(gw, "svc.internal") == {"ms0", "ms2"}, 20, gw.log)
    assert gw.process.poll() is None  # all of it without a restart


@pytest.mark.parametrize(("ref", "field", "reason"), [
    pytest.param({"kind": "Service", "name": "missing"}, "backendRefs[0].backendRef.name", "BackendNotFound",
                 id="missing-object"),
    pytest.param({"kind": "Service", "name": "vllm", "namespace": "elsewhere"}, "backendRefs[0].backendRef.namespace",
                 "RefNotPermitted", id="other-namespace"),
    pytest.param({"providerHost": "dashscope.aliyuncs.com", "kind": "Service", "name": "vllm"},
                 "backendRefs[0]", "InvalidSpec", id="both-providerHost-and-backendRef"),
])
def test_a_bad_backend_ref_gets_accepted_false_naming_the_field(kube, k8s_gateway, ref, field, reason):
    namespace = new_namespace(kube, "badref")
    entry = {"providerHost": ref.pop("providerHost"), "backendRef": ref} if "providerHost" in ref \
        else {"backendRef": ref}
    apply(kube, route(namespace, "bad.internal", [entry], name="bad"))
    gw = k8s_gateway()
    wait_until(lambda: kube.condition("llmroute", "bad", namespace).get("status") == "False", 20, gw.log)
    condition = kube.condition("llmroute", "bad", namespace)
    assert condition["reason"] == reason, condition
    assert f"spec.rules[0].{field}" in condition["message"], condition
