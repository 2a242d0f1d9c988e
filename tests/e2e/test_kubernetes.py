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

from support.helpers import CHAT, REPO, SEED_MANIFESTS, free_port, wait_until
from support.kube import KUBE_HOME
from support.kube import in_namespace as _in_namespace
from support.kube import new_namespace as _namespace
from support.kube import token as _token

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"


@pytest.fixture
def clean(kube):
    yield kube
    kube.run("delete", "llmroutes,llmproviders,llmtokenratelimits,llmdatapolicies", "--all", "--all-namespaces",
             "--wait=false",
             check=False)
    kube.run("delete", "secret", "llm-keys", "-n", "default", "--ignore-not-found", check=False)


# the operator's bindings for the seed's manifests, applied unchanged (issue 15)
KEY_ENV = ["--key-env", f"YOUR_DASHSCOPE_API_KEY={DASHSCOPE}", "--key-env", f"YOUR_MOONSHOT_API_KEY={MOONSHOT}"]


@pytest.fixture
def k8s_gateway(clean, gateway_factory, tmp_path):
    def start(*extra: str):
        return gateway_factory([], extra=["--kubernetes", *KEY_ENV, *extra],
                               env={"KUBECONFIG": clean.env["KUBECONFIG"]})
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
    pytest.param(("  - backendRefs:",
                  "  - matches:\n    - headers:\n        x: {exact: a, prefix: b}\n    backendRefs:"),
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
    deployment = json.loads(kube.run("get", "deployment", "llm-gateway-control", "-n", "llm-gateway",
                                     "-o", "json").stdout)
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
    template = json.loads(kube.run("get", "deployment", "sleep", "-o", "json").stdout)["spec"]["template"]
    # the label the egress gateway's NetworkPolicy admits (issue 33)
    assert template["metadata"]["labels"]["llm-gateway.dev/sidecar"] == "true"
    pod = template["spec"]
    (init,) = pod["initContainers"]
    assert "--to-ports 15001" in init["command"][-1] and "--uid-owner 1337" in init["command"][-1]
    (envoy,) = [c for c in pod["containers"] if c["name"] == "llm-gateway-envoy"]
    assert envoy["securityContext"]["runAsUser"] == 1337
    config_map = json.loads(kube.run("get", "configmap", "llm-gateway-envoy", "-o", "json").stdout)["data"]
    bootstrap = json.loads(config_map["envoy.json"])
    assert bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"] == 15001
    assert bootstrap["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"  # admin on loopback only
    # issue 15: only Envoy's container mounts the token for the control plane's audience, and uses it
    (token_volume,) = [v for v in pod["volumes"] if v["name"] == "llm-gateway-token"]
    (source,) = token_volume["projected"]["sources"]
    assert source["serviceAccountToken"]["audience"] == "llm-gateway"
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])} for c in pod["containers"]}
    assert mounts["llm-gateway-envoy"]["llm-gateway-token"] == "/var/run/secrets/llm-gateway"
    assert all("llm-gateway-token" not in m for name, m in mounts.items() if name != "llm-gateway-envoy")
    sds = json.loads(config_map["token-sds.json"])
    assert sds["resources"][0]["generic_secret"]["secret"]["filename"] == "/var/run/secrets/llm-gateway/token"
    for cluster in bootstrap["static_resources"]["clusters"][:2]:
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        injector = options["http_filters"][0]["typed_config"]["credential"]["typed_config"]
        assert injector["credential"]["sds_config"]["path_config_source"]["path"] == "/etc/llm-gateway/token-sds.json"
    control = json.loads(kube.run("get", "deployment", "llm-gateway-control", "-n", "llm-gateway", "-o", "json").stdout)
    (container,) = control["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("valueFrom", {}) for e in container["env"]}
    assert env["POD_NAMESPACE"] == {"fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}
    assert "YOUR_DASHSCOPE_API_KEY=dashscope.aliyuncs.com" in container["args"]

    account = "system:serviceaccount:llm-gateway:llm-gateway"
    kube.apply(REPO / "tests" / "support" / "inferencepool-crd.yaml")  # the Inference Extension's, as installed
    kube.run("wait", "--for", "condition=established", "crd/inferencepools.inference.networking.k8s.io",
             "--timeout", "60s")
    checks = [("list", "llmroutes.istio.alibabacloud.com", None, True),
              ("watch", "llmproviders.istio.alibabacloud.com", None, True),
              ("patch", "llmroutes.istio.alibabacloud.com", "status", True), ("get", "secrets", None, True),
              ("patch", "llmroutes.istio.alibabacloud.com", None, False),
              ("delete", "llmproviders.istio.alibabacloud.com", None, False),
              ("create", "secrets", None, False),
              # issue 24: the pods callers' tokens are bound to, read-only; their owners from the pods alone
              ("list", "pods", None, True), ("watch", "pods", None, True), ("get", "pods", None, True),
              ("create", "pods", None, False), ("patch", "pods", None, False), ("delete", "pods", None, False),
              ("get", "pods", "log", False), ("create", "pods", "exec", False),
              ("get", "replicasets.apps", None, False), ("get", "jobs.batch", None, False),
              ("create", "tokenreviews.authentication.k8s.io", None, True),
              ("create", "serviceaccounts", "token", False),
              ("watch", "llmtokenratelimits.llm-gateway.dev", None, True),
              ("patch", "llmtokenratelimits.llm-gateway.dev", "status", True),
              ("delete", "llmtokenratelimits.llm-gateway.dev", None, False),
              ("watch", "llmdatapolicies.llm-gateway.dev", None, True),
              ("patch", "llmdatapolicies.llm-gateway.dev", "status", True),
              ("update", "llmdatapolicies.llm-gateway.dev", None, False),
              # issue 25: in-cluster model servers, read-only
              ("watch", "services", None, True), ("list", "endpointslices.discovery.k8s.io", None, True),
              ("watch", "inferencepools.inference.networking.k8s.io", None, True),
              ("patch", "services", None, False), ("delete", "endpointslices.discovery.k8s.io", None, False),
              ("update", "inferencepools.inference.networking.k8s.io", None, False),
              ("patch", "inferencepools.inference.networking.k8s.io", "status", False)]
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
            ("get", f"{lease}/llm-gateway-control", "default", False), ("create", lease, "default", False),
            # issue 33: the workload CA's Secret, made in its own namespace (create cannot be limited by name)
            ("create", "secrets", "llm-gateway", True), ("create", "secrets", "default", False),
            ("update", "secrets", "llm-gateway", False), ("delete", "secrets", "llm-gateway", False)]:
        result = kube.run("auth", "can-i", verb, target, "--as", account, "-n", namespace, check=False)
        assert (result.returncode == 0) == allowed, (verb, target, namespace)
    kube.run("delete", "-k", str(REPO / "k8s" / "sidecar"), "--wait=false", check=False)


def test_committed_sidecar_bootstrap_matches_generator():
    import json
    import sys
    token = ["--token-file", "/var/run/secrets/llm-gateway/token"]
    out = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--sidecar", "--control",
                          "llm-gateway-control.llm-gateway.svc:18000", "--listen", "0.0.0.0:15001",
                          "--admin", "127.0.0.1:15000",
                          *token, "--token-sds", "/etc/llm-gateway/token-sds.json"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads((REPO / "k8s" / "sidecar" / "envoy-bootstrap.json").read_text()) == json.loads(out)
    sds = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", *token, "--print-token-sds"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads((REPO / "k8s" / "sidecar" / "token-sds.json").read_text()) == json.loads(sds)


# ---------------------------------------------------------------- issue 15: who may talk to the control plane


def _resigned(token: str, **claims) -> str:
    """The same token with some claims changed, signed again with the API server's ServiceAccount
    key: how a token past its expiry looks (the API server issues none shorter than 10 minutes)."""
    import json

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def unb64(part: str) -> bytes:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))

    header, payload, _ = token.split(".")
    body = {**json.loads(unb64(payload)), **claims}
    signing_input = f"{header}.{b64(json.dumps(body).encode())}".encode()
    key = serialization.load_pem_private_key((KUBE_HOME / "pki" / "sa.key").read_bytes(), password=None)
    return f"{signing_input.decode()}.{b64(key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256()))}"


def test_token_review_accepts_only_live_tokens_for_our_audience(clean):
    import asyncio
    import time

    from kubernetes import config as kconfig

    from extproc.dataplane.authentication import TokenReviewAuthenticator, kubernetes_review
    from extproc.policy.caller import Caller

    kube = clean
    team_a = _namespace(kube, "team-a", ("envoy", "gone"))
    right = _token(kube, team_a, "envoy")
    other_audience = _token(kube, team_a, "envoy", audience="something-else")
    now = int(time.time())
    expired = _resigned(right, iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    resigned_live = _resigned(right, iat=now - 60, nbf=now - 60, exp=now + 3600)  # shows the re-signing is sound
    gone = _token(kube, team_a, "gone")
    kube.run("delete", "serviceaccount", "gone", "-n", team_a)

    client = kconfig.new_client_from_config(config_file=kube.env["KUBECONFIG"])
    auth = TokenReviewAuthenticator(kubernetes_review(client), "llm-gateway")

    async def verify(token: str):
        return (await auth.verify(token))[1]

    async def main():
        return {name: await verify(token) for name, token in (
            ("right", right), ("resigned_live", resigned_live), ("other_audience", other_audience),
            ("expired", expired), ("gone", gone), ("garbage", "not-a-token"))}

    results = asyncio.run(main())
    envoy = Caller(team_a, "envoy")
    assert results == {"right": envoy, "resigned_live": envoy, "other_audience": None, "expired": None, "gone": None,
                       "garbage": None}, results
    assert auth.cached(right) == envoy  # later streams: no TokenReview


@pytest.fixture
def k8s_serve(clean, tmp_path, ca, fresh_providers):
    """`extproc serve --kubernetes` over TCP (TokenReview), as the control plane runs in a cluster."""
    import sys

    from support.helpers import upstream_args

    control, ext_proc = free_port(), free_port()
    home = _namespace(clean, "gw-home", ("envoy",))
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--kubernetes", "--control-namespace", home,
         "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}", "--metrics", "none",
         *upstream_args(ca, fresh_providers)],
        stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT,
        env={**os.environ, "KUBECONFIG": clean.env["KUBECONFIG"]})
    try:
        wait_until(lambda: "listening on 127.0.0.1" in (tmp_path / "serve.log").read_text() or serve.poll() is not None,
                   30)
        assert serve.poll() is None, (tmp_path / "serve.log").read_text()
        yield f"127.0.0.1:{ext_proc}", tmp_path / "serve.log", home
    finally:
        serve.terminate()
        serve.wait(10)


def test_a_namespace_gets_decisions_only_for_what_it_may_use(clean, k8s_serve):
    import json

    from support.auth_helpers import ext_proc_client
    from support.helpers import provider_yaml

    kube, (target, serve_log, home) = clean, k8s_serve
    team_a, team_b = _namespace(kube, "team-a", ("envoy",)), _namespace(kube, "team-b", ("envoy",))
    kube.run("apply", "-f", "-", stdin=_in_namespace(provider_yaml("own", DASHSCOPE, key="sk-team-a"), team_a))
    kube.run("apply", "-f", "-", stdin=_in_namespace(provider_yaml("shared", MOONSHOT, key="sk-shared"), home))
    wait_until(lambda: kube.condition("llmprovider", "own", team_a).get("status") == "True"
               and kube.condition("llmprovider", "shared", home).get("status") == "True", 15,
               lambda: serve_log.read_text())
    a, b = _token(kube, team_a, "envoy"), _token(kube, team_b, "envoy")
    wait_until(lambda: ext_proc_client(target, DASHSCOPE, a)["authorization"] == "Bearer sk-team-a", 10,
               lambda: serve_log.read_text())
    # namespace B on namespace A's provider: as if the host were unknown
    assert ext_proc_client(target, DASHSCOPE, b) == {"code": "OK", "authorization": None, "status": 404,
                                                     "connected": True}
    # the control plane's namespace is everyone's
    assert ext_proc_client(target, MOONSHOT, b)["authorization"] == "Bearer sk-shared"
    # no token, or one for the API server's audience: nothing
    for token in (None, _token(kube, team_a, "envoy", audience="https://kubernetes.default.svc")):
        assert ext_proc_client(target, DASHSCOPE, token)["code"] == "UNAUTHENTICATED"
    # exportTo widens it
    kube.run("patch", "llmprovider", "own", "-n", team_a, "--type", "merge", "-p",
             json.dumps({"spec": {"exportTo": [".", team_b]}}))
    wait_until(lambda: ext_proc_client(target, DASHSCOPE, b)["authorization"] == "Bearer sk-team-a", 10,
               lambda: serve_log.read_text())
    assert "sk-team-a" not in serve_log.read_text() and a not in serve_log.read_text()


def test_key_variables_expand_only_where_the_operator_bound_them(clean, k8s_gateway, fresh_providers, keys):
    kube = clean
    tenant_ns = _namespace(kube, "tenant")
    kube.apply(seed("01"))  # ${YOUR_DASHSCOPE_API_KEY} for dashscope.aliyuncs.com: bound by KEY_ENV
    # a tenant's provider, sending the control plane's DashScope key to a host of its choosing
    tenant = _in_namespace(seed("01").read_text().replace("name: dashscope-qwen", "name: exfiltrate").replace(
        f"host: {DASHSCOPE}", f"host: {MOONSHOT}"), tenant_ns)
    assert "${YOUR_DASHSCOPE_API_KEY}" in tenant and "name: exfiltrate" in tenant
    kube.run("apply", "-f", "-", stdin=tenant)
    gw = k8s_gateway()
    assert model_of(gw, DASHSCOPE) == "qwen1.5-72b-chat"
    assert (fresh_providers[DASHSCOPE].requests[-1].headers["authorization"]
            == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}")
    wait_until(lambda: kube.condition("llmprovider", "exfiltrate", tenant_ns).get("reason") == "KeyEnvNotAllowed", 10,
               gw.log)
    condition = kube.condition("llmprovider", "exfiltrate", tenant_ns)
    assert condition["status"] == "False" and "--key-env YOUR_DASHSCOPE_API_KEY=api.moonshot.cn" in condition["message"]
    assert model_of(gw, MOONSHOT) == 404
    assert not any(keys["YOUR_DASHSCOPE_API_KEY"] in str(r.headers) for r in fresh_providers[MOONSHOT].requests)
    assert keys["YOUR_DASHSCOPE_API_KEY"] not in gw.log()


def test_egress_gateway_manifests_apply_and_rbac_is_least_privilege(clean):
    import json

    from extproc.policy.gateway_binding import DEFAULT_GATEWAY_PORT, default_address

    kube = clean
    kube.run("apply", "-f", "-", stdin=for_kubernetes_1_20((REPO / "k8s" / "control-plane.yaml").read_text()))
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
        assert port["port"] == DEFAULT_GATEWAY_PORT and port["targetPort"] == "mtls"
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["mtls"] == int(args[args.index("--listen") + 1].rpartition(":")[2])
        # issue 33: mutual TLS with a certificate from the control plane, for the identity the sidecars
        # accept (the gateway's name as its ServiceAccount), with the projected token of that account
        assert "--insecure-plain-gateway" not in args
        assert args[args.index("--control-plane") + 1] == "llm-gateway-control.llm-gateway.svc.cluster.local:18000"
        assert gateway == f"llm-gateway/{pod['serviceAccountName']}"
        (token_volume,) = [v for v in pod["volumes"] if v["name"] == "llm-gateway-token"]
        (source,) = token_volume["projected"]["sources"]
        mount = next(m for m in container["volumeMounts"] if m["name"] == "llm-gateway-token")
        assert source["serviceAccountToken"]["audience"] == "llm-gateway"
        assert args[args.index("--token-file") + 1] == f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"
        # the NetworkPolicy: only pods with the sidecar, in admitted namespaces, reach the gateway's port
        policy = json.loads(kube.run("get", "networkpolicy", "llm-egress-gateway", "-n", "llm-gateway",
                                     "-o", "json").stdout)["spec"]
        assert policy["podSelector"]["matchLabels"] == {"app": "llm-egress-gateway"}
        assert policy["policyTypes"] == ["Ingress"]
        serving = next(rule for rule in policy["ingress"] if rule["ports"] == [{"protocol": "TCP", "port": 8080}])
        (peer,) = serving["from"]
        assert peer == {"namespaceSelector": {"matchLabels": {"llm-gateway.dev/egress-gateway": "allowed"}},
                        "podSelector": {"matchLabels": {"llm-gateway.dev/sidecar": "true"}}}
        assert {p["port"] for rule in policy["ingress"] for p in rule["ports"]} == {8080, 9464}
        control = json.loads(kube.run("get", "deployment", "llm-gateway-control", "-n", "llm-gateway",
                                      "-o", "json").stdout)
        control_args = control["spec"]["template"]["spec"]["containers"][0]["args"]
        assert control_args[control_args.index("--egress-gateway") + 1] == gateway
        assert default_address(gateway) == "llm-egress-gateway.llm-gateway.svc.cluster.local:80"

        account = "system:serviceaccount:llm-gateway:llm-egress-gateway"
        checks = [("list", "llmroutes.istio.alibabacloud.com", None, True),
                  ("watch", "llmproviders.istio.alibabacloud.com", None, True), ("get", "secrets", None, True),
                  ("patch", "llmroutes.istio.alibabacloud.com", "status", False),  # the control plane writes status
                  ("update", "llmproviders.istio.alibabacloud.com", "status", False),
                  ("patch", "llmroutes.istio.alibabacloud.com", None, False), ("create", "secrets", None, False),
                  # issue 33: its callers' pods, read-only
                  ("list", "pods", None, True), ("watch", "pods", None, True), ("patch", "pods", None, False),
                  ("create", "tokenreviews.authentication.k8s.io", None, False)]
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
    kube.run("apply", "-f", "-",
             stdin=seed("02").read_text().replace("spec:\n", "spec:\n  gateways: [llm-gateway/egress]\n", 1))
    # its listener kept plain (the requests here come straight from the test, not from a sidecar)
    gw = k8s_gateway("--gateway", "llm-gateway/egress", "--insecure-plain-gateway")
    assert model_of(gw, DASHSCOPE) == "qwen1.5-72b-chat"  # the route bound to this gateway, and its provider
    assert (fresh_providers[DASHSCOPE].requests[-1].headers["authorization"]
            == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}")
    assert model_of(gw, MOONSHOT) == 404  # a provider of the mesh: not decided here
    # a route bound to this gateway later reaches it
    kube.run("apply", "-f", "-",
             stdin=seed("06").read_text().replace("spec:\n", "spec:\n  gateways: [llm-gateway/egress]\n", 1))
    wait_until(lambda: model_of(gw, "demo-llm-server") != 404, 15, gw.log)
    # the control plane (not running here) writes the conditions; the gateway writes none
    for kind, name in (("llmroute", "dashscope-route"), ("llmprovider", "dashscope-qwen"),
                       ("llmroute", "demo-llm-server")):
        assert kube.condition(kind, name) == {}


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


DATA_POLICY = """apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: no-secrets-out, namespace: default}
spec:
  hosts: [dashscope.aliyuncs.com]
  rules:
  - name: cards-and-mail
    detectors: [{builtin: bank-card}, {builtin: email}]
    action: ACTION
  - name: tickets
    detectors: [{regex: 'REGEX', name: acme-ticket}]
    action: block
"""


def data_policy(action: str = "mask", regex: str = "ACME-[0-9]{6}", extra: str = "") -> str:
    return DATA_POLICY.replace("ACTION", action).replace("REGEX", regex) + extra


def test_data_policy_objects_are_watched_with_accepted_conditions(clean, k8s_gateway, fresh_providers):
    kube = clean
    kube.apply(seed("01"))
    # the API server refuses what the schema says: an action that does not exist
    refused = kube.run("apply", "-f", "-", stdin=data_policy(action="delete"), check=False)
    assert refused.returncode != 0 and "action" in refused.stderr, refused.stderr
    kube.run("apply", "-f", "-", stdin=data_policy())
    gw = k8s_gateway()
    wait_until(lambda: kube.condition("llmdatapolicy", "no-secrets-out").get("status") == "True", 10, gw.log)
    dashscope = fresh_providers[DASHSCOPE]
    mail = {"messages": [{"role": "user", "content": "mail jane@example.com"}]}

    def forwarded() -> str:
        resp = gw.request(DASHSCOPE, mail)
        assert resp.status == 200, resp.body
        return dashscope.requests[-1].body["messages"][0]["content"]

    assert forwarded() == "mail [EMAIL]"
    assert gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "ACME-123456"}]}).status == 400
    listing = kube.run("get", "llmdatapolicies").stdout
    # (kubectl 1.20 shows the first of a column's values)
    assert re.search(r"no-secrets-out\s+\[\"dashscope.aliyuncs.com\"\]\s+cards-and-mail\s+mask\s+True",
                     listing), listing

    # a version RE2 cannot run: refused naming the field, and the last accepted one stays in force
    kube.run("apply", "-f", "-", stdin=data_policy(regex="(?=ACME)[0-9]+"))
    wait_until(lambda: kube.condition("llmdatapolicy", "no-secrets-out").get("status") == "False", 10, gw.log)
    condition = kube.condition("llmdatapolicy", "no-secrets-out")
    assert condition["reason"] == "InvalidSpec", condition
    assert "spec.rules[1].detectors[0].regex: RE2 cannot run this pattern" in condition["message"]
    assert "the last accepted one (generation 1) stays in force" in condition["message"]
    assert forwarded() == "mail [EMAIL]"
    assert gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "ACME-123456"}]}).status == 400

    # fixed, with what does less than it seems (a judge no route serves): a warning in an Accepted=True condition
    judged = "  - name: judged\n    detectors: [{judge: {host: guard.ai.svc}}]\n    action: log\n"
    kube.run("apply", "-f", "-", stdin=data_policy(action="log", extra=judged + "  responses: {check: true}\n"))
    wait_until(lambda: kube.condition("llmdatapolicy", "no-secrets-out").get("status") == "True", 10, gw.log)
    assert "spec.rules[2].detectors[0].judge.host: no LLMRoute or LLMProvider serves host 'guard.ai.svc'" in \
        kube.condition("llmdatapolicy", "no-secrets-out")["message"]
    wait_until(lambda: forwarded() == "mail jane@example.com", 10, gw.log)

    # deleted: nothing of it stays (not even a last accepted version)
    kube.run("apply", "-f", "-", stdin=data_policy(regex="(?=x)"))
    wait_until(lambda: kube.condition("llmdatapolicy", "no-secrets-out").get("status") == "False", 10, gw.log)
    kube.run("delete", "llmdatapolicy", "no-secrets-out")
    wait_until(lambda: gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "ACME-123456"}]}).status
               == 200, 10, gw.log)


def test_replicas_elect_one_status_writer_and_another_takes_over_when_it_dies(clean, tmp_path, keys):
    """Two `serve --kubernetes` replicas: one is elected and writes status; killed (SIGKILL, no
    release), the other takes over after the lease duration and status updates go on."""
    import secrets
    import signal
    import sys


    kube = clean
    lease = f"test-{secrets.token_hex(4)}"

    class Replica:
        def __init__(self, name: str):
            self.log_file = tmp_path / f"serve-{name}.log"
            self.process = subprocess.Popen(
                [sys.executable, "-m", "extproc", "serve", "--kubernetes", "--namespace", "default",
                 "--listen", f"127.0.0.1:{free_port()}", "--ext-proc-listen", f"127.0.0.1:{free_port()}",
                 "--metrics", "none", "--lease-namespace", "default", "--lease-name", lease, "--lease-duration", "4",
                 "--drain-grace", "0.5", *KEY_ENV],
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


def test_a_provider_whose_name_does_not_resolve_says_so_in_its_condition(clean, k8s_gateway, tmp_path):
    """`AddressResolved` on each LLMProvider found by DNS (docs/reliability.md#dns): False with
    the reason while its name does not resolve, True once it does; `Accepted` stays True, and the
    provider at a fixed address (--resolve) gets none."""
    from extproc.testing.dns_providers import provider_docs
    from extproc.testing.dns_server import DnsServer

    kube = clean
    with DnsServer() as dns:
        kube.apply(seed("01"))
        kube.run("apply", "-f", "-", stdin=provider_docs(["gone.dns.test"], "sk-test-inline"))
        gw = k8s_gateway("--dns-resolver", dns.address)
        wait_until(lambda: kube.condition("llmprovider", "p-0", kind_of="AddressResolved").get("status") == "False",
                   20, gw.log)
        condition = kube.condition("llmprovider", "p-0", kind_of="AddressResolved")
        assert condition["reason"] == "NameNotFound", condition
        assert "gone.dns.test does not exist in DNS (NXDOMAIN)" in condition["message"], condition
        assert "provider_address_unknown" in condition["message"]
        assert kube.condition("llmprovider", "p-0")["status"] == "True"  # Accepted: the config is fine
        assert kube.condition("llmprovider", "dashscope-qwen", kind_of="AddressResolved") == {}
        dns.answer("gone.dns.test", "127.0.0.1")
        wait_until(lambda: kube.condition("llmprovider", "p-0", kind_of="AddressResolved").get("status") == "True",
                   30, gw.log)
        assert kube.condition("llmprovider", "p-0")["status"] == "True"
        assert kube.condition("llmprovider", "dashscope-qwen")["status"] == "True"
