"""Who is calling, against a real kube-apiserver: pods created as objects (labels, owner
references), tokens requested for them with the TokenRequest API bound to each pod, and two
sidecar Envoys presenting them to `extproc serve --kubernetes` over TCP. The caller is the pod
its Envoy's token is bound to: `sourceLabels` send one workload to one model and the other to the
default, a relabelled pod moves with its next request, `workloadSelector` hides a route from the
other proxy, no header the application sends changes any of it, a namespace budget caps a
workload whatever headers it sends, and a pod that is gone fails closed."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

import pytest

from support.helpers import CHAT, upstream_args, wait_until
from support.kube import create_pod, new_namespace, token
from support.sidecar import SidecarEnvoy

DASHSCOPE = "dashscope.aliyuncs.com"
PAYMENTS_POD = "payments-7d9f8c7b5-q8x2z"
WEB_POD = "web"  # a bare pod: its own workload


def provider(namespace: str, key: str) -> str:
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {{name: qwen, namespace: {namespace}}}
spec:
  host: {DASHSCOPE}
  path: /compatible-mode/v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig: {{model: qwen-turbo, apiKey: {key}}}
    routeSpecificConfigs:
      payments:
        openAIConfig: {{model: qwen-max}}
"""


def routes(namespace: str) -> str:
    """The platform team's routes: the payments workloads get qwen-max, everyone else the default;
    and a route only the payments proxies see."""
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: dash, namespace: {namespace}}}
spec:
  host: {DASHSCOPE}
  rules:
  - name: payments
    matches:
    - sourceLabels: {{app: payments}}
    backendRefs:
    - providerHost: {DASHSCOPE}
  - backendRefs:
    - providerHost: {DASHSCOPE}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: audit, namespace: {namespace}}}
spec:
  host: audit-llm
  workloadSelector:
    labels: {{app: payments}}
  rules:
  - backendRefs:
    - providerHost: {DASHSCOPE}
"""


def budget(namespace: str) -> str:
    return f"""apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {{name: per-namespace, namespace: {namespace}}}
spec:
  host: {DASHSCOPE}
  key: {{caller: namespace}}
  rules:
  - name: team
    tokens: 40
    per: 1h
"""


@pytest.fixture
def mesh(kube, tmp_path, ca, fresh_providers, keys):
    """The control plane (`serve --kubernetes`, its pods' labels trusted for 2 s once out of date)
    and two sidecars in namespace `shop`: the payments Deployment's pod and a bare `web` pod, each
    Envoy presenting a token bound to its own pod."""
    from extproc.testing.ports import free_port

    home = new_namespace(kube, "gw-home")
    shop = new_namespace(kube, "shop", ("payments", "web"))
    create_pod(kube, shop, PAYMENTS_POD, "payments", {"app": "payments", "pod-template-hash": "7d9f8c7b5"},
               owner=("ReplicaSet", "payments-7d9f8c7b5"))
    create_pod(kube, shop, WEB_POD, "web", {"app": "web"})
    kube.run("apply", "-f", "-", stdin=provider(home, keys["YOUR_DASHSCOPE_API_KEY"]))
    kube.run("apply", "-f", "-", stdin=routes(shop))
    control, ext_proc, metrics = free_port(), free_port(), free_port()
    serve_log = tmp_path / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--kubernetes", "--control-namespace", home,
         "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
         "--metrics", f"127.0.0.1:{metrics}", "--identity-grace", "2", "--lease-namespace", home,
         "--workers", "1",  # one process: the budget's counts in one place (several share them through Redis)
         *upstream_args(ca, fresh_providers)],
        stdout=serve_log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "KUBECONFIG": kube.env["KUBECONFIG"]})
    envoys: list[SidecarEnvoy] = []
    try:
        wait_until(lambda: "listening on 127.0.0.1" in serve_log.read_text() or serve.poll() is not None, 30)
        assert serve.poll() is None, serve_log.read_text()
        for pod, account in ((PAYMENTS_POD, "payments"), (WEB_POD, "web")):
            envoys.append(SidecarEnvoy(tmp_path, pod, control, ext_proc,
                                       token(kube, shop, account, pod=pod)))
        payments, web = envoys
        wait_until(lambda: all(e.request(DASHSCOPE, CHAT)[0] == 200 for e in envoys), 30,
                   lambda: serve_log.read_text() + payments.log())
        yield shop, payments, web, serve_log, metrics
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.terminate()
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        kube.run("delete", "llmroutes,llmproviders,llmtokenratelimits", "--all", "--all-namespaces", "--wait=false",
                 check=False)


def model(envoy: SidecarEnvoy, host: str = DASHSCOPE, headers: dict | None = None) -> str | int:
    status, body, _ = envoy.request(host, CHAT, headers)
    return body["model"] if status == 200 else status


def error_code(envoy: SidecarEnvoy, host: str = DASHSCOPE, headers: dict | None = None) -> tuple[int, str]:
    status, body, _ = envoy.request(host, CHAT, headers)
    return status, (body or {}).get("error", {}).get("code", "")


def test_the_calling_pod_decides_routes_budgets_and_metrics(kube, mesh, keys):
    shop, payments, web, serve_log, metrics_port = mesh

    # sourceLabels: the payments workload gets qwen-max, the web pod the default
    assert model(payments) == "qwen-max"
    assert model(web) == "qwen-turbo"
    # no header the application sends changes who it is: not a label, not an identity, not the other's token
    payments_token = (payments.dir / "token" / "token").read_text()
    for claim in ({"app": "payments"}, {"x-llm-gateway-caller": f"{shop}/payments"},
                  {"x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/{shop}/sa/payments"},
                  {"authorization": f"Bearer {payments_token}"}):
        assert model(web, headers=claim) == "qwen-turbo", claim

    # workloadSelector: the payments proxy sees the audit route; the web proxy gets an unknown host
    assert model(payments, "audit-llm") == "qwen-turbo"
    assert error_code(web, "audit-llm") == (404, "unknown_host")

    # the access log and the metrics say who called: namespace and workload (the pod only in the log)
    wait_until(lambda: any(e["host"] == "audit-llm" for e in payments.access_entries()), 10)
    entry = next(e for e in payments.access_entries() if e["host"] == "audit-llm")
    assert entry["caller"] == {"namespace": shop, "service_account": "payments", "workload": "payments",
                               "pod": PAYMENTS_POD}
    assert next(e for e in web.access_entries() if e["status"] == 200)["caller"]["workload"] == WEB_POD

    def caller_requests() -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert PAYMENTS_POD not in text  # never a metric label
        spent: dict[str, float] = {}
        for s in (s for f in text_string_to_metric_families(text) for s in f.samples):
            if s.name == "llm_gateway_spend_requests_total" and s.labels["llm_route"] == f"{shop}/dash":
                spent[s.labels["llm_caller"]] = spent.get(s.labels["llm_caller"], 0) + s.value
        return spent

    # who spent what: by namespace/workload (the payments Deployment, the bare pod by its own name)
    wait_until(lambda: caller_requests().get(f"{shop}/payments", 0) >= 1
               and caller_requests().get(f"{shop}/{WEB_POD}", 0) >= 5, 10, lambda: str(caller_requests()))

    # relabelling a pod moves its next request, without a restart
    kube.run("label", "pod", WEB_POD, "-n", shop, "app=payments", "--overwrite")
    wait_until(lambda: model(web) == "qwen-max", 15, serve_log.read_text)
    assert model(web, "audit-llm") == "qwen-turbo"  # and the workloadSelector now selects it too
    kube.run("label", "pod", WEB_POD, "-n", shop, "app=web", "--overwrite")
    wait_until(lambda: model(web) == "qwen-turbo", 15, serve_log.read_text)

    # an invalid label gets a condition naming the field, and the object is not served
    bad = routes(shop).split("---")[1].replace("name: audit", "name: bad").replace("audit-llm", "bad-llm").replace(
        "app: payments", "bad key!: x")
    kube.run("apply", "-f", "-", stdin=bad)
    wait_until(lambda: kube.condition("llmroute", "bad", shop).get("status") == "False", 15, serve_log.read_text)
    condition = kube.condition("llmroute", "bad", shop)
    assert condition["reason"] == "InvalidSpec" and "spec.workloadSelector.labels" in condition["message"]
    assert "label key 'bad key!'" in condition["message"]

    # a budget by namespace caps the workload whatever headers it sends, and the namespace's other pods
    kube.run("apply", "-f", "-", stdin=budget(shop))
    wait_until(lambda: kube.condition("llmtokenratelimit", "per-namespace", shop).get("status") == "True", 15,
               serve_log.read_text)
    wait_until(lambda: "x-ratelimit-limit-tokens" in payments.request(DASHSCOPE, CHAT)[2], 10)
    for user in range(8):
        status, _, headers = payments.request(DASHSCOPE, CHAT, {"x-user-id": f"user-{user}",
                                                               "x-fake-total-tokens": "25"})
        if status == 429:
            break
        assert status == 200 and headers["x-ratelimit-limit-tokens"] == "40"
    wait_until(lambda: payments.request(DASHSCOPE, CHAT, {"x-user-id": "someone-new"})[0] == 429, 10)
    assert payments.request(DASHSCOPE, CHAT, {"x-user-id": "x", "user-type": "subscriber"})[0] == 429
    assert web.request(DASHSCOPE, CHAT, {"x-user-id": "another"})[0] == 429  # the same namespace's budget
    kube.run("delete", "llmtokenratelimit", "per-namespace", "-n", shop)
    wait_until(lambda: model(payments) == "qwen-max", 15, serve_log.read_text)

    # a pod that is gone: its last known labels for the grace (2 s here), then what depends on them
    # fails closed with a clear 503; what does not (another namespace's provider host) still works
    kube.run("delete", "pod", PAYMENTS_POD, "-n", shop, "--wait=false")
    wait_until(lambda: error_code(payments) == (503, "caller_unresolved"), 20, serve_log.read_text)
    status, body, _ = payments.request(DASHSCOPE, CHAT)
    assert "labels are not known" in body["error"]["message"]
    assert error_code(payments, "audit-llm") == (503, "caller_unresolved")
    assert model(web) == "qwen-turbo"  # the other pod is unaffected
    assert keys["YOUR_DASHSCOPE_API_KEY"] not in serve_log.read_text()
