"""Against a real kube-apiserver (1.20, with etcd, on loopback): the CRDs, schema checks at apply
time, and `extproc up --kubernetes` following creates, updates and deletes through a real Envoy,
with each object's `Accepted` condition written back.

The API server comes from ../shared/kube-test-apiserver.sh (built once by `.ci/run`, or by
`kube-test-apiserver.sh install`; about 5 minutes on 2 cores)."""

from __future__ import annotations

import base64
import os
import re
import subprocess
from pathlib import Path

import pytest

from helpers import CHAT, REPO, SEED_MANIFESTS, wait_until

KUBE_SCRIPT = Path(os.environ.get("KUBE_TEST_SCRIPT", REPO.parent / "shared" / "kube-test-apiserver.sh"))
KUBE_HOME = Path(os.environ.get("KUBE_TEST_HOME", "/var/cache/kube-test-apiserver"))
DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"


class Kube:
    def __init__(self, kubeconfig: str):
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}
        self.kubectl = str(KUBE_HOME / "bin" / "kubectl")

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.kubectl, *args], input=stdin, capture_output=True, text=True, env=self.env, timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def apply(self, *files: Path) -> None:
        for f in files:
            self.run("apply", "-f", str(f))

    def condition(self, kind: str, name: str, namespace: str = "default") -> dict:
        out = self.run("get", kind, name, "-n", namespace, "-o",
                       "jsonpath={.status.conditions[?(@.type==\"Accepted\")]}").stdout
        import json
        return json.loads(out) if out.strip() else {}


@pytest.fixture(scope="module")
def kube():
    assert KUBE_SCRIPT.exists(), f"{KUBE_SCRIPT} is missing (the shared/ folder beside the repository)"
    started = subprocess.run(["bash", str(KUBE_SCRIPT), "start"], capture_output=True, text=True, timeout=300)
    assert started.returncode == 0, f"kube-apiserver did not start (run `{KUBE_SCRIPT} install` once):\n{started.stderr}"
    kubeconfig = re.search(r"export KUBECONFIG=(\S+)", started.stdout).group(1)
    k = Kube(kubeconfig)
    k.apply(REPO / "k8s" / "crds.yaml")
    for crd in ("llmproviders", "llmroutes"):
        k.run("wait", "--for", "condition=established", f"crd/{crd}.istio.alibabacloud.com", "--timeout", "60s")
    yield k
    subprocess.run(["bash", str(KUBE_SCRIPT), "stop"], capture_output=True, timeout=60)


@pytest.fixture
def clean(kube):
    yield kube
    kube.run("delete", "llmroutes,llmproviders", "--all", "--all-namespaces", "--wait=false", check=False)
    kube.run("delete", "secret", "llm-keys", "-n", "default", "--ignore-not-found", check=False)


@pytest.fixture
def k8s_gateway(clean, gateway_factory, tmp_path):
    def start(*extra: str):
        return gateway_factory([], extra=["--kubernetes", *extra], env={"KUBECONFIG": clean.env["KUBECONFIG"]})
    return start


def seed(prefix: str) -> Path:
    (path,) = [p for p in SEED_MANIFESTS.iterdir() if p.name.startswith(prefix)]
    return path


def model_of(gw, host: str, headers: dict | None = None) -> str | int:
    resp = gw.request(host, CHAT, headers)
    return resp.json()["model"] if resp.status == 200 else resp.status


@pytest.mark.parametrize("change, message", [
    pytest.param(("weight: 50", "weight: -5"), "should be greater than or equal to 0", id="negative-weight"),
    pytest.param(("weight: 50", "weight: lots"), "spec.rules.backendRefs.weight", id="weight-not-a-number"),
    pytest.param(("host: demo-llm-server", "host: http://demo-llm-server"), "spec.host", id="host-with-scheme"),
    pytest.param(("  - backendRefs:", "  - matches:\n    - headers:\n        x: {exact: a, prefix: b}\n    backendRefs:"),
                 "should have at most 1 properties", id="two-match-kinds"),
    pytest.param(None, "spec.rules", id="no-rules"),
])
def test_schema_invalid_objects_are_refused_at_apply_time(clean, change, message):
    original = seed("06").read_text()
    text = original.replace(*change) if change else original.split("  rules:")[0] + "  rules: []\n"
    assert text != original
    result = clean.run("apply", "-f", "-", stdin=text, check=False)
    assert result.returncode != 0, result.stdout
    assert message in result.stderr, result.stderr
    assert clean.run("get", "llmroutes", "-A", "-o", "name").stdout.strip() == ""


def test_create_update_delete_reach_routing_and_status(clean, k8s_gateway, fresh_providers):
    kube = clean
    kube.apply(seed("01"))
    gw = k8s_gateway()
    assert model_of(gw, DASHSCOPE) == "qwen1.5-72b-chat"
    wait_until(lambda: kube.condition("llmprovider", "dashscope-qwen").get("status") == "True", 10)

    # scenario 1 as an update: the route, then the provider with its route-specific config
    kube.apply(seed("02"), seed("03"))
    wait_until(lambda: model_of(gw, DASHSCOPE, {"user-type": "subscriber"}) == "qwen-turbo", 10, gw.log)
    assert model_of(gw, DASHSCOPE) == "qwen1.5-72b-chat"

    # scenario 2: a new provider, a Service, a weighted route
    kube.apply(seed("04"), seed("05"), seed("06"))
    wait_until(lambda: {model_of(gw, "demo-llm-server") for _ in range(20)} == {"qwen1.5-72b-chat", "moonshot-v1-8k"},
               15, gw.log)
    wait_until(lambda: kube.condition("llmroute", "demo-llm-server").get("status") == "True", 10)
    listing = kube.run("get", "llmroutes").stdout
    assert re.search(r"demo-llm-server\s+demo-llm-server\s+migrate-rule\s+True", listing), listing

    # a delete: moonshot goes; the weighted route now names a provider nobody serves
    kube.run("delete", "llmprovider", "moonshot")
    wait_until(lambda: model_of(gw, MOONSHOT) == 404, 10, gw.log)
    wait_until(lambda: kube.condition("llmroute", "demo-llm-server").get("status") == "False", 10)
    condition = kube.condition("llmroute", "demo-llm-server")
    assert condition["reason"] == "ProviderNotFound"
    assert "spec.rules[0].backendRefs[1].providerHost" in condition["message"]
    assert model_of(gw, "demo-llm-server") == 404
    # the good objects keep serving
    assert model_of(gw, DASHSCOPE, {"user-type": "subscriber"}) == "qwen-turbo"
    assert kube.condition("llmroute", "dashscope-route")["status"] == "True"
    assert "LLMRoute default/demo-llm-server" in gw.log()


def test_api_key_from_a_secret_follows_secret_updates(clean, k8s_gateway, fresh_providers, keys):
    kube = clean
    good = keys["YOUR_DASHSCOPE_API_KEY"]
    kube.run("create", "secret", "generic", "llm-keys", "-n", "default", f"--from-literal=dashscope={good}")
    provider = seed("01").read_text().replace("apiKey: ${YOUR_DASHSCOPE_API_KEY}",
                                              "apiKeySecretRef: {name: llm-keys, key: dashscope}")
    kube.run("apply", "-f", "-", stdin=provider)
    gw = k8s_gateway()
    assert model_of(gw, DASHSCOPE) == "qwen1.5-72b-chat"
    assert fresh_providers[DASHSCOPE].requests[-1].headers["authorization"] == f"Bearer {good}"

    rotated = base64.b64encode(b"sk-rotated-key").decode()
    kube.run("patch", "secret", "llm-keys", "-n", "default", "-p", f'{{"data": {{"dashscope": "{rotated}"}}}}')
    wait_until(lambda: fresh_providers[DASHSCOPE].requests[-1].headers["authorization"] == "Bearer sk-rotated-key"
               if model_of(gw, DASHSCOPE) == 401 else False, 10, gw.log)  # the fake knows only the old key

    kube.run("delete", "secret", "llm-keys", "-n", "default")
    wait_until(lambda: kube.condition("llmprovider", "dashscope-qwen").get("reason") == "SecretNotFound", 10, gw.log)
    assert model_of(gw, DASHSCOPE) == 404
    assert "sk-rotated-key" not in gw.log() and good not in gw.log()


def test_manifests_apply_and_rbac_is_least_privilege(clean):
    kube = clean
    kube.run("apply", "-f", str(REPO / "k8s" / "control-plane.yaml"))
    kube.run("apply", "-k", str(REPO / "k8s" / "sidecar"))
    import json
    pod = json.loads(kube.run("get", "deployment", "sleep", "-o", "json").stdout)["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    assert "--to-ports 15001" in init["command"][-1] and "--uid-owner 1337" in init["command"][-1]
    (envoy,) = [c for c in pod["containers"] if c["name"] == "llm-gateway-envoy"]
    assert envoy["securityContext"]["runAsUser"] == 1337
    bootstrap = json.loads(json.loads(kube.run("get", "configmap", "llm-gateway-envoy", "-o", "json").stdout)["data"]["envoy.json"])
    assert bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 15001

    account = "system:serviceaccount:llm-gateway:llm-gateway"
    checks = [("list", "llmroutes.istio.alibabacloud.com", None, True), ("watch", "llmproviders.istio.alibabacloud.com", None, True),
              ("patch", "llmroutes.istio.alibabacloud.com", "status", True), ("get", "secrets", None, True),
              ("patch", "llmroutes.istio.alibabacloud.com", None, False), ("delete", "llmproviders.istio.alibabacloud.com", None, False),
              ("create", "secrets", None, False), ("list", "pods", None, False)]
    for verb, resource, subresource, allowed in checks:
        args = ["auth", "can-i", verb, resource, "--as", account, "-n", "default"]
        if subresource:
            args.append(f"--subresource={subresource}")
        assert (kube.run(*args, check=False).returncode == 0) == allowed, (verb, resource, subresource)
    kube.run("delete", "-k", str(REPO / "k8s" / "sidecar"), "--wait=false", check=False)


def test_committed_sidecar_bootstrap_matches_generator():
    import json
    import sys
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--sidecar", "--control",
                          "llm-gateway-control.llm-gateway.svc:18000", "--listen", "0.0.0.0:15001", "--admin", "127.0.0.1:15000"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads((REPO / "k8s" / "sidecar" / "envoy-bootstrap.json").read_text()) == json.loads(out)


def test_egress_gateway_manifests_apply_and_rbac_is_least_privilege(clean):
    import json
    from extproc.gateways import DEFAULT_GATEWAY_PORT, default_address

    kube = clean
    kube.run("apply", "-f", str(REPO / "k8s" / "control-plane.yaml"))
    kube.run("apply", "-k", str(REPO / "k8s" / "egress-gateway"))
    try:
        pod = json.loads(kube.run("get", "deployment", "llm-egress-gateway", "-n", "llm-gateway", "-o", "json").stdout)[
            "spec"]["template"]["spec"]
        (container,) = pod["containers"]
        args = container["args"]
        gateway = args[args.index("--gateway") + 1]
        assert args[:2] == ["up", "--kubernetes"] and container["securityContext"]["readOnlyRootFilesystem"] is True
        assert {"name": "TMPDIR", "value": "/run/llm-gateway"} in container["env"]
        assert pod["volumes"][0]["emptyDir"]["medium"] == "Memory"
        # the name in spec.gateways is the Service's namespace/name, and the control plane knows it,
        # at the address it derives from that name
        service = json.loads(kube.run("get", "service", "llm-egress-gateway", "-n", "llm-gateway", "-o", "json").stdout)
        assert gateway == f"{service['metadata']['namespace']}/{service['metadata']['name']}"
        (port,) = service["spec"]["ports"]
        assert port["port"] == DEFAULT_GATEWAY_PORT and port["targetPort"] == "http"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["http"] == int(args[args.index("--listen") + 1].rpartition(":")[2])
        control = json.loads(kube.run("get", "deployment", "llm-gateway-control", "-n", "llm-gateway", "-o", "json").stdout)
        control_args = control["spec"]["template"]["spec"]["containers"][0]["args"]
        assert control_args[control_args.index("--egress-gateway") + 1] == gateway
        assert default_address(gateway) == "llm-egress-gateway.llm-gateway.svc.cluster.local:80"

        account = "system:serviceaccount:llm-gateway:llm-egress-gateway"
        checks = [("list", "llmroutes.istio.alibabacloud.com", None, True),
                  ("watch", "llmproviders.istio.alibabacloud.com", None, True), ("get", "secrets", None, True),
                  ("patch", "llmroutes.istio.alibabacloud.com", "status", False),  # the control plane writes status
                  ("update", "llmproviders.istio.alibabacloud.com", "status", False),
                  ("patch", "llmroutes.istio.alibabacloud.com", None, False), ("create", "secrets", None, False),
                  ("list", "pods", None, False), ("create", "tokenreviews.authentication.k8s.io", None, False)]
        for verb, resource, subresource, allowed in checks:
            can = ["auth", "can-i", verb, resource, "--as", account, "-n", "default"]
            if subresource:
                can.append(f"--subresource={subresource}")
            assert (kube.run(*can, check=False).returncode == 0) == allowed, (verb, resource, subresource)
    finally:
        kube.run("delete", "-k", str(REPO / "k8s" / "egress-gateway"), "--wait=false", check=False)


def test_egress_gateway_serves_only_its_routes_from_kubernetes_and_leaves_status_alone(clean, k8s_gateway,
                                                                                      fresh_providers, keys):
    kube = clean
    kube.apply(seed("01"), seed("04"))
    kube.run("apply", "-f", "-", stdin=seed("02").read_text().replace("spec:\n", "spec:\n  gateways: [llm-gateway/egress]\n", 1))
    gw = k8s_gateway("--gateway", "llm-gateway/egress")
    assert model_of(gw, DASHSCOPE) == "qwen1.5-72b-chat"  # the route bound to this gateway, and its provider
    assert fresh_providers[DASHSCOPE].requests[-1].headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
    assert model_of(gw, MOONSHOT) == 404  # a provider of the mesh: not decided here
    # a route bound to this gateway later reaches it
    kube.run("apply", "-f", "-", stdin=seed("06").read_text().replace("spec:\n", "spec:\n  gateways: [llm-gateway/egress]\n", 1))
    wait_until(lambda: model_of(gw, "demo-llm-server") != 404, 15, gw.log)
    # the control plane (not running here) writes the conditions; the gateway writes none
    for kind, name in (("llmroute", "dashscope-route"), ("llmprovider", "dashscope-qwen"), ("llmroute", "demo-llm-server")):
        assert kube.condition(kind, name) == {}
