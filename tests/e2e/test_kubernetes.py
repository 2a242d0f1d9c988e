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
    for crd in ("llmproviders.istio.alibabacloud.com", "llmroutes.istio.alibabacloud.com",
                "llmtokenratelimits.llm-gateway.dev"):
        k.run("wait", "--for", "condition=established", f"crd/{crd}", "--timeout", "60s")
    yield k
    subprocess.run(["bash", str(KUBE_SCRIPT), "stop"], capture_output=True, timeout=60)


@pytest.fixture
def clean(kube):
    yield kube
    kube.run("delete", "llmroutes,llmproviders,llmtokenratelimits", "--all", "--all-namespaces", "--wait=false",
             check=False)
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
              ("create", "secrets", None, False), ("list", "pods", None, False),
              ("watch", "llmtokenratelimits.llm-gateway.dev", None, True),
              ("patch", "llmtokenratelimits.llm-gateway.dev", "status", True),
              ("delete", "llmtokenratelimits.llm-gateway.dev", None, False)]
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


BUDGET = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: per-user, namespace: default}
spec:
  host: HOST
  key: {header: x-user-id}
  rules:
  - name: everyone
    tokens: TOKENS
    per: 1h
"""


def test_token_budget_objects_are_watched_with_accepted_conditions(clean, k8s_gateway, fresh_providers):
    kube = clean
    kube.apply(seed("01"))
    # the API server refuses what the schema says: no budget of zero tokens
    refused = kube.run("apply", "-f", "-", stdin=BUDGET.replace("HOST", DASHSCOPE).replace("TOKENS", "0"), check=False)
    assert refused.returncode != 0 and "tokens" in refused.stderr
    kube.run("apply", "-f", "-", stdin=BUDGET.replace("HOST", DASHSCOPE).replace("TOKENS", "40"))
    gw = k8s_gateway()
    wait_until(lambda: kube.condition("llmtokenratelimit", "per-user").get("status") == "True", 10, gw.log)
    headers = {"x-user-id": "kim", "x-fake-total-tokens": "17"}
    resp = gw.request(DASHSCOPE, CHAT, headers)
    assert resp.status == 200 and resp.headers["x-ratelimit-limit-tokens"] == "40"
    listing = kube.run("get", "llmtokenratelimits").stdout
    assert re.search(r"per-user\s+dashscope.aliyuncs.com\s+x-user-id\s+everyone\s+True", listing), listing

    # a host nobody serves: left out, with the reason and the field
    kube.run("apply", "-f", "-", stdin=BUDGET.replace("HOST", "nowhere.example.com").replace("TOKENS", "40"))
    wait_until(lambda: kube.condition("llmtokenratelimit", "per-user").get("status") == "False", 10, gw.log)
    condition = kube.condition("llmtokenratelimit", "per-user")
    assert condition["reason"] == "HostNotFound" and "spec.host" in condition["message"]
    wait_until(lambda: "x-ratelimit-limit-tokens" not in gw.request(DASHSCOPE, CHAT, headers).headers, 10, gw.log)
