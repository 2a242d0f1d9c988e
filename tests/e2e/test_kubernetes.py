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


def for_kubernetes_1_20(manifest: str) -> str:
    """The test API server is 1.20: it serves PodDisruptionBudget as policy/v1beta1 (v1 since 1.21)
    and HorizontalPodAutoscaler as autoscaling/v2beta2 (v2 since 1.23), same fields as used here."""
    return manifest.replace("apiVersion: policy/v1\n", "apiVersion: policy/v1beta1\n").replace(
        "apiVersion: autoscaling/v2\n", "apiVersion: autoscaling/v2beta2\n")


def test_manifests_apply_and_rbac_is_least_privilege(clean):
    kube = clean
    for name in ("control-plane.yaml", "autoscaling.yaml"):
        kube.run("apply", "-f", "-", stdin=for_kubernetes_1_20((REPO / "k8s" / name).read_text()))
    import json
    deployment = json.loads(kube.run("get", "deployment", "llm-gateway-control", "-n", "llm-gateway", "-o", "json").stdout)
    assert deployment["spec"]["replicas"] == 2
    control_pod = deployment["spec"]["template"]["spec"]
    assert control_pod["affinity"]["podAntiAffinity"]
    assert control_pod["terminationGracePeriodSeconds"] == 30
    assert control_pod["containers"][0]["lifecycle"]["preStop"]
    pdb = json.loads(kube.run("get", "pdb", "llm-gateway-control", "-n", "llm-gateway", "-o", "json").stdout)
    assert pdb["spec"]["minAvailable"] == 1
    assert kube.run("get", "hpa", "llm-gateway-control", "-n", "llm-gateway").returncode == 0
    service = json.loads(kube.run("get", "service", "llm-gateway-control", "-n", "llm-gateway", "-o", "json").stdout)
    assert service["spec"]["clusterIP"] == "None"  # headless: each sidecar sees every replica
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
    # the Lease of the leader election: its own, in its own namespace, and nothing more
    lease = "leases.coordination.k8s.io"
    for verb, target, namespace, allowed in [
            ("get", f"{lease}/llm-gateway-control", "llm-gateway", True),
            ("update", f"{lease}/llm-gateway-control", "llm-gateway", True),
            ("create", lease, "llm-gateway", True),
            ("get", f"{lease}/other", "llm-gateway", False), ("update", f"{lease}/other", "llm-gateway", False),
            ("delete", f"{lease}/llm-gateway-control", "llm-gateway", False), ("list", lease, "llm-gateway", False),
            ("watch", lease, "llm-gateway", False), ("patch", f"{lease}/llm-gateway-control", "llm-gateway", False),
            ("get", f"{lease}/llm-gateway-control", "default", False), ("create", lease, "default", False)]:
        result = kube.run("auth", "can-i", verb, target, "--as", account, "-n", namespace, check=False)
        assert (result.returncode == 0) == allowed, (verb, target, namespace)
    kube.run("delete", "-k", str(REPO / "k8s" / "sidecar"), "--wait=false", check=False)


def test_committed_sidecar_bootstrap_matches_generator():
    import json
    import sys
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--sidecar", "--control",
                          "llm-gateway-control.llm-gateway.svc:18000", "--listen", "0.0.0.0:15001", "--admin", "127.0.0.1:15000"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads((REPO / "k8s" / "sidecar" / "envoy-bootstrap.json").read_text()) == json.loads(out)


def test_replicas_elect_one_status_writer_and_another_takes_over_when_it_dies(clean, tmp_path, keys):
    """Two `serve --kubernetes` replicas: one is elected and writes status; killed (SIGKILL, no
    release), the other takes over after the lease duration and status updates go on."""
    import secrets
    import signal
    import sys

    from helpers import free_port

    kube = clean
    lease = f"test-{secrets.token_hex(4)}"

    class Replica:
        def __init__(self, name: str):
            self.log_file = tmp_path / f"serve-{name}.log"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "extproc", "serve", "--kubernetes", "--namespace", "default",
                 "--listen", f"127.0.0.1:{free_port()}", "--ext-proc-listen", f"127.0.0.1:{free_port()}",
                 "--metrics", "none", "--lease-namespace", "default", "--lease-name", lease, "--lease-duration", "4",
                 "--drain-grace", "0.5"],
                stdout=self.log_file.open("wb"), stderr=subprocess.STDOUT, env={**kube.env, **keys})

        def log(self) -> str:
            return self.log_file.read_text(errors="replace")

    replicas = [Replica("a"), Replica("b")]
    try:
        kube.apply(seed("01"))
        wait_until(lambda: kube.condition("llmprovider", "dashscope-qwen").get("status") == "True", 30,
                   lambda: "\n".join(r.log() for r in replicas))
        wait_until(lambda: sum("elected leader" in r.log() for r in replicas) == 1, 30)
        (leader,) = [r for r in replicas if "elected leader" in r.log()]
        (other,) = [r for r in replicas if r is not leader]
        holder = kube.run("get", "lease", lease, "-n", "default", "-o", "jsonpath={.spec.holderIdentity}").stdout
        assert holder and holder in leader.log()
        assert "status of LLMProvider default/dashscope-qwen: Accepted=True" in leader.log()
        assert "status of" not in other.log()  # exactly one writer

        leader.process.send_signal(signal.SIGKILL)  # no release: the lease must expire
        leader.process.wait()
        broken = seed("01").read_text().replace("apiKey: ${YOUR_DASHSCOPE_API_KEY}",
                                                "apiKeySecretRef: {name: missing-secret, key: k}")
        kube.run("apply", "-f", "-", stdin=broken)
        # the lease duration (4 s), a retry round, and the rebuild
        wait_until(lambda: kube.condition("llmprovider", "dashscope-qwen").get("reason") == "SecretNotFound", 30,
                   other.log)
        assert "elected leader" in other.log()
        assert "status of LLMProvider default/dashscope-qwen: Accepted=False" in other.log()

        other.process.send_signal(signal.SIGTERM)
        assert other.process.wait(30) == 0, other.log()
        assert f"lease default/{lease} released" in other.log()
        holder = kube.run("get", "lease", lease, "-n", "default", "-o", "jsonpath={.spec.holderIdentity}").stdout
        assert holder == ""
    finally:
        for r in replicas:
            if r.process.poll() is None:
                r.process.kill()
                r.process.wait()
