"""Who is calling, in local mode: the operator states the calling workload on the command line
(`extproc up --source-labels k=v --source-namespace NS`), and the same `sourceLabels` rule and
`workloadSelector` decide through a real Envoy; the access log and the metrics carry it. The
seed's own manifests (with the vip rule also held by the payments workload) drive it."""

from __future__ import annotations

from support.helpers import CHAT, add_seed, wait_until
from support.manifests import write

DASHSCOPE = "dashscope.aliyuncs.com"


def config(tmp_path):
    """The seed's DashScope provider (its `vip-route` config: qwen-turbo) and its route, whose vip
    rule also holds for the payments workload (sourceLabels); a route only the payments proxies
    see (workloadSelector)."""
    directory = tmp_path / "config"
    directory.mkdir()
    add_seed(directory, "03")
    route = {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute",
             "metadata": {"name": "dashscope-route", "namespace": "shop"},
             "spec": {"host": DASHSCOPE, "rules": [
                 {"name": "vip-route", "matches": [{"headers": {"user-type": {"exact": "subscriber"}}},
                                                   {"sourceLabels": {"app": "payments"}}],
                  "backendRefs": [{"providerHost": DASHSCOPE}]},
                 {"backendRefs": [{"providerHost": DASHSCOPE}]}]}}
    audit = {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute",
             "metadata": {"name": "audit", "namespace": "shop"},
             "spec": {"host": "audit-llm", "workloadSelector": {"labels": {"app": "payments"}},
                      "rules": [{"backendRefs": [{"providerHost": DASHSCOPE}]}]}}
    write(directory / "10-routes.yaml", route, audit)
    return directory


def model(gw, host: str = DASHSCOPE, headers: dict | None = None):
    resp = gw.request(host, CHAT, headers)
    return resp.json()["model"] if resp.status == 200 else (resp.status, resp.json()["error"]["code"])


def test_source_labels_drive_the_same_rule_through_a_real_envoy(tmp_path, gateway_factory):
    directory = config(tmp_path)
    payments = gateway_factory(directory, extra=["--source-labels", "app=payments,tier=gold",
                                                 "--source-namespace", "shop"])
    anyone = gateway_factory(directory)

    assert model(payments) == "qwen-turbo"  # the vip rule, by the workload's labels
    assert model(anyone) == "qwen1.5-72b-chat"  # the default rule
    assert model(anyone, headers={"user-type": "subscriber"}) == "qwen-turbo"  # the header entry still holds
    assert model(anyone, headers={"app": "payments"}) == "qwen1.5-72b-chat"  # a header is not a label

    # workloadSelector: seen by the payments proxy only (in its namespace), unknown to the other
    assert model(payments, "audit-llm") == "qwen1.5-72b-chat"
    assert model(anyone, "audit-llm") == (404, "unknown_host")

    # the access log and the metrics carry the stated caller
    wait_until(lambda: len(payments.access_entries()) >= 2, 10)
    entry = payments.access_entries()[0]
    assert (entry["caller"], entry["rule"]) == ({"namespace": "shop", "service_account": "local"}, "vip-route")
    wait_until(lambda: len(anyone.access_entries()) >= 3, 10)
    assert all(e["caller"] is None for e in anyone.access_entries())

    def spent_by(gw) -> set[str]:  # who spent what (docs/cost.md): the stated caller, namespace/local
        return {dict(labels)["llm_caller"] for name, labels in gw.metrics()
                if name == "llm_gateway_spend_requests_total"}

    wait_until(lambda: spent_by(payments) == {"shop/local"}, 10, lambda: str(payments.metrics()))
    assert spent_by(anyone) == {""}


def test_extproc_route_explains_the_same_decision(tmp_path, keys):
    import os
    import subprocess
    import sys

    directory = config(tmp_path)

    def route(*args: str) -> str:
        result = subprocess.run([sys.executable, "-m", "extproc", "route", "--config", str(directory), *args],
                                capture_output=True, text=True, env={**os.environ, **keys}, timeout=30)
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = route("--host", DASHSCOPE, "--source-labels", "app=payments", "--source-namespace", "shop")
    assert "rule: vip-route\nwhy: matches[1]: sourceLabels app=payments" in out and "model qwen-turbo" in out
    assert "rule: rules[1]" in route("--host", DASHSCOPE, "-H", "app: payments")
    assert "route: shop/audit" in route("--host", "audit-llm", "--source-labels", "app=payments",
                                        "--source-namespace", "shop")
