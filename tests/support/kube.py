"""A real kube-apiserver (1.20, with etcd, on loopback) for the end-to-end tests: started once
per test module by the `kube` fixture (`../shared/kube-test-apiserver.sh`), kubectl as `Kube`,
fresh namespaces, and ServiceAccount tokens from the TokenRequest API (optionally bound to a
pod, as the kubelet's projected tokens are)."""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
from pathlib import Path

from support.helpers import REPO, free_port

KUBE_SCRIPT = Path(os.environ.get("KUBE_TEST_SCRIPT", REPO.parent / "shared" / "kube-test-apiserver.sh"))
KUBE_HOME = Path(os.environ.get("KUBE_TEST_HOME", "/var/cache/kube-test-apiserver"))


class Kube:
    def __init__(self, kubeconfig: str):
        self.env = {**os.environ, "KUBECONFIG": kubeconfig}
        self.kubectl = str(KUBE_HOME / "bin" / "kubectl")

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        result = subprocess.run([self.kubectl, *args], input=stdin, capture_output=True, text=True, env=self.env,
                                timeout=60)
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed:\n{result.stdout}{result.stderr}")
        return result

    def apply(self, *files: Path) -> None:
        for f in files:
            self.run("apply", "-f", str(f))

    def condition(self, kind: str, name: str, namespace: str = "default", kind_of: str = "Accepted") -> dict:
        """An object's status condition of type `kind_of` (Accepted, AddressResolved), or {}."""
        out = self.run("get", kind, name, "-n", namespace, "-o",
                       f"jsonpath={{.status.conditions[?(@.type==\"{kind_of}\")]}}").stdout
        return json.loads(out) if out.strip() else {}


def started_api_server(tmp_path_factory):
    """The `kube` fixture's body (tests/e2e/conftest.py): an API server of this test run's own, with
    our CRDs, for one test module: its own run directory (etcd data, pid files) and port, and a
    kubeconfig of its own naming that port, so that test runs side by side on one machine
    (several worktrees) never share or stop each other's server. The build and the PKI are shared."""
    assert KUBE_SCRIPT.exists(), f"{KUBE_SCRIPT} is missing (the shared/ folder beside the repository)"
    run_dir, port = tmp_path_factory.mktemp("kube-run"), free_port()
    env = {**os.environ, "KUBE_TEST_RUN_DIR": str(run_dir), "KUBE_TEST_APISERVER_PORT": str(port)}
    started = subprocess.run(["bash", str(KUBE_SCRIPT), "start"], capture_output=True, text=True, timeout=300,
                             env=env)
    assert started.returncode == 0, \
        f"kube-apiserver did not start (run `{KUBE_SCRIPT} install` once):\n{started.stderr}"
    shared = Path(re.search(r"export KUBECONFIG=(\S+)", started.stdout).group(1)).read_text()
    kubeconfig = run_dir / "kubeconfig"
    kubeconfig.write_text(re.sub(r"server: https://127\.0\.0\.1:\d+", f"server: https://127.0.0.1:{port}", shared))
    kubeconfig.chmod(0o600)
    k = Kube(str(kubeconfig))
    k.apply(REPO / "k8s" / "crds.yaml")
    for crd in ("llmproviders.istio.alibabacloud.com", "llmroutes.istio.alibabacloud.com",
                "llmtokenratelimits.llm-gateway.dev"):
        k.run("wait", "--for", "condition=established", f"crd/{crd}", "--timeout", "60s")
    yield k
    subprocess.run(["bash", str(KUBE_SCRIPT), "stop"], capture_output=True, timeout=60, env=env)


def new_namespace(kube: Kube, base: str, accounts: tuple[str, ...] = ()) -> str:
    """A new namespace (a fresh name each time: this API server runs no namespace controller, so a
    deleted namespace never goes away) with these ServiceAccounts."""
    name = f"{base}-{secrets.token_hex(3)}"
    kube.run("create", "namespace", name)
    for account in accounts:
        kube.run("create", "serviceaccount", account, "-n", name)
    return name


def in_namespace(manifest: str, namespace: str) -> str:
    assert "\nmetadata:\n" in manifest and "namespace:" not in manifest
    return manifest.replace("\nmetadata:\n", f"\nmetadata:\n  namespace: {namespace}\n", 1)


def token(kube: Kube, namespace: str, account: str, audience: str = "llm-gateway", pod: str | None = None) -> str:
    """A ServiceAccount token from the TokenRequest API (what the kubelet projects into Envoy's
    container): with `pod`, bound to that pod, as the kubelet's are."""
    spec: dict = {"audiences": [audience], "expirationSeconds": 600}
    if pod is not None:
        uid = kube.run("get", "pod", pod, "-n", namespace, "-o", "jsonpath={.metadata.uid}").stdout.strip()
        spec["boundObjectRef"] = {"kind": "Pod", "apiVersion": "v1", "name": pod, "uid": uid}
    body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
    out = kube.run("create", "--raw", f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token", "-f", "-",
                   stdin=body).stdout
    return json.loads(out)["status"]["token"]


def create_pod(kube: Kube, namespace: str, name: str, account: str, labels: dict[str, str],
               owner: tuple[str, str] | None = None) -> None:
    """A pod as an object only (this API server has no scheduler or kubelet: it stays Pending),
    with labels, a ServiceAccount and, where given, a controlling owner (kind, name), as a
    Deployment's ReplicaSet makes them."""
    meta: dict = {"name": name, "namespace": namespace, "labels": labels}
    if owner is not None:
        meta["ownerReferences"] = [{"apiVersion": "apps/v1", "kind": owner[0], "name": owner[1],
                                    "uid": "00000000-0000-4000-8000-" + secrets.token_hex(6), "controller": True}]
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
           "spec": {"serviceAccountName": account, "containers": [{"name": "app", "image": "busybox"}]}}
    kube.run("apply", "-f", "-", stdin=json.dumps(pod))
