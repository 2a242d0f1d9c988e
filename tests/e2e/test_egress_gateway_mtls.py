"""The egress gateway takes only the mesh's sidecars, and decides for the workload each one is,
against a real kube-apiserver: pods created as objects (labels, an owner), tokens bound to them
(TokenRequest), the control plane (`serve --kubernetes`, its workload CA a Secret it makes), two
sidecar Envoys presenting those tokens, and the egress gateway (`up --kubernetes --gateway`)
whose Envoy's listener requires a client certificate the control plane issued.

One setup for the module: a sidecar with its certificate is served and decided as itself
(sourceLabels, workloadSelector, the access log, the metrics), whatever headers it sends; a
plain client, a client without a certificate, with a self-signed one, an expired one or one of
another trust domain gets nothing and no provider request is made; a budget keyed on the
workload caps a caller at the gateway; certificates rotate under load without losing a request.
"""

from __future__ import annotations

import base64
import datetime as dt
import http.client
import json
import os
import ssl
import subprocess
import sys
import threading
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from extproc.ops.workload_ca import CA_SECRET, WorkloadCA
from extproc.testing.ports import free_port
from support.helpers import CHAT, Gateway, start_gateway, upstream_args, wait_until
from support.kube import create_pod, new_namespace, token
from support.sidecar import SidecarEnvoy

DASHSCOPE = "dashscope.aliyuncs.com"
PAYMENTS_POD = "payments-7d9f8c7b5-q8x2z"
WEB_POD = "web"
TTL_S = 12  # workload certificates renewed every 6 s, and connections to the gateway renewed as often


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


def routes(namespace: str, gateway: str) -> str:
    """The platform team's routes, bound to the egress gateway: the payments workloads get
    qwen-max, everyone else the default; and a route only the payments proxies see."""
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {{name: dash, namespace: {namespace}}}
spec:
  host: {DASHSCOPE}
  gateways: [{gateway}]
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
  gateways: [{gateway}]
  workloadSelector:
    labels: {{app: payments}}
  rules:
  - backendRefs:
    - providerHost: {DASHSCOPE}
"""


def budget(namespace: str) -> str:
    return f"""apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {{name: per-workload, namespace: {namespace}}}
spec:
  host: {DASHSCOPE}
  key: {{caller: workload}}
  rules:
  - name: each
    tokens: 40
    per: 1h
"""


@dataclass
class Mesh:
    kube: object
    home: str
    shop: str
    gateway: Gateway
    payments: SidecarEnvoy
    web: SidecarEnvoy
    serve_log: Path
    tmp: Path

    def logs(self) -> str:
        return self.serve_log.read_text(errors="replace") + self.gateway.log() + self.payments.log()

    def ca(self) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        """The workload CA, as the control plane keeps it: the Secret it made (which another
        replica starting now reads instead of making its own)."""
        data = json.loads(self.kube.run("get", "secret", CA_SECRET, "-n", self.home, "-o", "json").stdout)["data"]
        cert = x509.load_pem_x509_certificate(base64.b64decode(data["ca.crt"]))
        key = serialization.load_pem_private_key(base64.b64decode(data["ca.key"]), None)
        from kubernetes import config

        replica = WorkloadCA.from_kubernetes(config.new_client_from_config(self.kube.env["KUBECONFIG"]), self.home)
        assert replica.cert == cert
        return cert, key


@pytest.fixture(scope="module")
def mesh(kube, tmp_path_factory, ca, providers, keys):
    tmp = tmp_path_factory.mktemp("mtls")
    home = new_namespace(kube, "gw-home", ("egress",))
    shop = new_namespace(kube, "shop", ("payments", "web"))
    gateway_name = f"{home}/egress"  # runs as ServiceAccount `egress` of its namespace
    create_pod(kube, shop, PAYMENTS_POD, "payments", {"app": "payments", "pod-template-hash": "7d9f8c7b5"},
               owner=("ReplicaSet", "payments-7d9f8c7b5"))
    create_pod(kube, shop, WEB_POD, "web", {"app": "web"})
    kube.run("apply", "-f", "-", stdin=provider(home, keys["YOUR_DASHSCOPE_API_KEY"]))
    kube.run("apply", "-f", "-", stdin=routes(shop, gateway_name))
    env = {"KUBECONFIG": kube.env["KUBECONFIG"]}
    token_dir = tmp / "gateway-token"
    token_dir.mkdir(mode=0o700)
    (token_dir / "token").write_text(token(kube, home, "egress"))
    control, ext_proc = free_port(), free_port()
    # the gateway first (its address is the control plane's to know); it waits for its certificate
    gateway = start_gateway([], tmp, {**keys, **env}, [
        *upstream_args(ca, providers), "--kubernetes", "--gateway", gateway_name, "--control-namespace", home,
        "--control-plane", f"127.0.0.1:{control}", "--token-file", str(token_dir / "token"),
        "--identity-grace", "2"], wait=False)
    serve_log = tmp / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--kubernetes", "--control-namespace", home,
         "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}", "--metrics", "none",
         "--lease-namespace", home, "--workers", "1", "--workload-cert-ttl", str(TTL_S),
         "--egress-gateway", f"{gateway_name}=127.0.0.1:{gateway.listen_port}", *upstream_args(ca, providers)],
        stdout=serve_log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})
    envoys: list[SidecarEnvoy] = []
    try:
        wait_until(lambda: "ready:" in gateway.log() or gateway.process.poll() is not None, 45,
                   lambda: gateway.log() + serve_log.read_text())
        assert gateway.process.poll() is None, gateway.log() + serve_log.read_text()
        for pod, account in ((PAYMENTS_POD, "payments"), (WEB_POD, "web")):
            envoys.append(SidecarEnvoy(tmp, pod, control, ext_proc, token(kube, shop, account, pod=pod)))
        payments, web = envoys
        wait_until(lambda: all(e.request(DASHSCOPE, CHAT)[0] == 200 for e in envoys), 30,
                   lambda: serve_log.read_text() + gateway.log() + payments.log())
        yield Mesh(kube, home, shop, gateway, payments, web, serve_log, tmp)
    finally:
        for envoy in envoys:
            envoy.stop()
        serve.terminate()
        try:
            serve.wait(15)
        except subprocess.TimeoutExpired:
            serve.kill()
            serve.wait()
        gateway.stop()
        kube.run("delete", "llmroutes,llmproviders,llmtokenratelimits", "--all", "--all-namespaces", "--wait=false",
                 check=False)


def model(envoy: SidecarEnvoy, host: str = DASHSCOPE, headers: dict | None = None) -> str | tuple[int, str]:
    status, body, _ = envoy.request(host, CHAT, headers)
    return body["model"] if status == 200 else (status, (body or {}).get("error", {}).get("code", ""))


def admin(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode()


def counters(port: int) -> dict[str, int]:
    lines = (line.partition(": ") for line in admin(port, "/stats").splitlines())
    return {name: int(value) for name, _, value in lines if value.isdigit()}


def handshakes(mesh: Mesh) -> int:
    """TLS handshakes the gateway's listener completed."""
    return sum(v for k, v in counters(mesh.gateway.admin_port).items()
               if k.startswith("listener.") and k.endswith(".ssl.handshake"))


def spent_by(mesh: Mesh) -> dict[str, float]:
    spent: dict[str, float] = {}
    for (name, labels), value in mesh.gateway.metrics().items():
        if name == "llm_gateway_spend_requests_total":
            caller = dict(labels)["llm_caller"]
            spent[caller] = spent.get(caller, 0) + value
    return spent


def test_a_sidecar_is_served_and_decided_as_the_workload_its_certificate_names(mesh, providers, keys):
    payments, web = mesh.payments, mesh.web
    # sourceLabels at the gateway: the payments workload gets qwen-max, the web pod the default
    assert model(payments) == "qwen-max"
    assert model(web) == "qwen-turbo"
    # nothing the application sends stands in for its certificate
    for claim in ({"app": "payments"}, {"x-llm-gateway-caller": f"{mesh.shop}/payments"},
                  {"x-forwarded-client-cert": f"By=spiffe://cluster.local/ns/{mesh.shop}/sa/payments;"
                                              f"URI=spiffe://cluster.local/ns/{mesh.shop}/sa/payments"},
                  {"x-envoy-peer-metadata-id": f"sidecar~{PAYMENTS_POD}.{mesh.shop}"}):
        assert model(web, headers=claim) == "qwen-turbo", claim
    # workloadSelector at the gateway: the payments proxy sees the audit route, the web proxy does not
    assert model(payments, "audit-llm") == "qwen-turbo"
    assert model(web, "audit-llm") == (404, "unknown_host")

    # the gateway's access log says who called: namespace, ServiceAccount, workload and pod
    wait_until(lambda: any(e["host"] == "audit-llm" and e["status"] == 200 for e in mesh.gateway.access_entries()),
               10)
    entry = next(e for e in mesh.gateway.access_entries() if e["host"] == "audit-llm" and e["status"] == 200)
    assert entry["caller"] == {"namespace": mesh.shop, "service_account": "payments", "workload": "payments",
                               "pod": PAYMENTS_POD}
    assert {e["caller"]["workload"] for e in mesh.gateway.access_entries() if e["route"] == f"{mesh.shop}/dash"} \
        >= {"payments", WEB_POD}
    # and its metrics: who spent what, by namespace/workload (never the pod)
    wait_until(lambda: spent_by(mesh).get(f"{mesh.shop}/payments", 0) >= 2
               and spent_by(mesh).get(f"{mesh.shop}/{WEB_POD}", 0) >= 5, 10, lambda: str(spent_by(mesh)))
    assert not any(PAYMENTS_POD in dict(labels).get("llm_caller", "") for _, labels in mesh.gateway.metrics())

    # only the gateway holds the key; the sidecar's Envoy holds its certificate, its private key redacted
    assert all(r.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
               for r in providers[DASHSCOPE].requests)
    dump = admin(payments.admin, "/config_dump?include_eds")
    assert "llm_provider_dashscope_aliyuncs_com" not in dump and keys["YOUR_DASHSCOPE_API_KEY"] not in dump
    assert "PRIVATE KEY" not in dump and "W3JlZGFjdGVkXQ==" in dump  # base64 of [redacted]
    certs = json.loads(admin(payments.admin, "/certs"))["certificates"]
    sans = [san["uri"] for c in certs for chain in c.get("cert_chain", []) for san in chain["subject_alt_names"]]
    assert f"spiffe://cluster.local/ns/{mesh.shop}/sa/payments" in sans
    assert keys["YOUR_DASHSCOPE_API_KEY"] not in mesh.serve_log.read_text() + mesh.gateway.log()


def issue(signer_cert: x509.Certificate | None, signer_key, uri: str, pod: str, uid: str, directory: Path,
          stem: str, not_after: dt.datetime, not_before: dt.datetime | None = None) -> tuple[str, str]:
    """A client certificate with `uri` as its URI SAN and the pod in its subject, signed by
    `signer_*` (None: self-signed): (certificate file, key file)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, pod), x509.NameAttribute(NameOID.SERIAL_NUMBER, uid)])
    cert = (x509.CertificateBuilder().subject_name(subject)
            .issuer_name(signer_cert.subject if signer_cert is not None else subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before or not_after - dt.timedelta(hours=1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .sign(signer_key if signer_cert is not None else key, hashes.SHA256()))
    cert_file, key_file = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_file), str(key_file)


def direct(mesh: Mesh, cert: tuple[str, str] | None, tls: bool = True) -> int | str:
    """What a client reaching the gateway's port directly gets: the status, or how it failed."""
    if tls:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE  # the client's own check is not tested
        if cert is not None:
            context.load_cert_chain(*cert)
        conn: http.client.HTTPConnection = http.client.HTTPSConnection("127.0.0.1", mesh.gateway.listen_port,
                                                                       context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", mesh.gateway.listen_port, timeout=10)
    try:
        conn.request("POST", "/", body=json.dumps(CHAT), headers={"host": DASHSCOPE,
                                                                   "content-type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read() or b"null")
        return f"{response.status} {body.get('model', '') if isinstance(body, dict) else ''}".strip()
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def test_callers_without_a_certificate_of_the_mesh_get_nothing(mesh, providers):
    ca_cert, ca_key = mesh.ca()
    now = dt.datetime.now(dt.UTC)
    uri = f"spiffe://cluster.local/ns/{mesh.shop}/sa/payments"
    uid = json.loads(mesh.kube.run("get", "pod", PAYMENTS_POD, "-n", mesh.shop, "-o", "json").stdout)["metadata"]["uid"]
    valid = issue(ca_cert, ca_key, uri, PAYMENTS_POD, uid, mesh.tmp, "valid", now + dt.timedelta(hours=1))
    expired = issue(ca_cert, ca_key, uri, PAYMENTS_POD, uid, mesh.tmp, "expired", now - dt.timedelta(minutes=5))
    self_signed = issue(None, None, uri, PAYMENTS_POD, uid, mesh.tmp, "self-signed", now + dt.timedelta(hours=1))
    other_domain = issue(ca_cert, ca_key, f"spiffe://example.org/ns/{mesh.shop}/sa/payments", PAYMENTS_POD, uid,
                         mesh.tmp, "other-domain", now + dt.timedelta(hours=1))
    before = len(providers[DASHSCOPE].requests)
    refused = {"plain HTTP (a pod without a sidecar)": direct(mesh, None, tls=False),
               "TLS without a certificate": direct(mesh, None),
               "a self-signed certificate": direct(mesh, self_signed),
               "an expired certificate of the mesh's CA": direct(mesh, expired),
               "a certificate of another trust domain": direct(mesh, other_domain)}
    for what, outcome in refused.items():
        assert not str(outcome)[:1].isdigit(), (what, outcome)  # no HTTP answer at all: the handshake failed
    assert len(providers[DASHSCOPE].requests) == before  # and nothing reached a provider
    # the same client with a valid certificate of the mesh is served, as the workload it names
    assert direct(mesh, valid) == "200 qwen-max"
    assert len(providers[DASHSCOPE].requests) == before + 1
    stats = counters(mesh.gateway.admin_port)
    failed = {k.rpartition(".")[2]: v for k, v in stats.items() if k.startswith("listener.") and (
        k.endswith((".ssl.fail_verify_error", ".ssl.fail_verify_san", ".ssl.fail_verify_no_cert",
                    ".ssl.connection_error")))}
    assert failed.get("fail_verify_no_cert", 0) >= 1 and failed.get("fail_verify_error", 0) >= 2, failed
    assert failed.get("fail_verify_san", 0) >= 1, failed


def test_a_budget_keyed_on_the_workload_caps_a_caller_at_the_gateway_whatever_it_sends(mesh):
    kube, payments, web = mesh.kube, mesh.payments, mesh.web
    kube.run("apply", "-f", "-", stdin=budget(mesh.shop))
    try:
        # the control plane accepts it (the gateway applies it: the host is the gateway's)
        wait_until(lambda: kube.condition("llmtokenratelimit", "per-workload", mesh.shop).get("status") == "True", 15,
                   mesh.logs)
        wait_until(lambda: "x-ratelimit-limit-tokens" in payments.request(DASHSCOPE, CHAT)[2], 15, mesh.logs)
        def claiming(user: int) -> dict[str, str]:  # every request a new user, another identity claimed
            return {"x-user-id": f"user-{user}", "x-fake-total-tokens": "25",
                    "x-forwarded-client-cert": f"URI=spiffe://cluster.local/ns/{mesh.shop}/sa/web-{user}"}

        for user in range(2):  # 25 tokens each: the budget of 40 is spent (charged from the access log)
            status, _, headers = payments.request(DASHSCOPE, CHAT, claiming(user))
            assert status == 200 and headers["x-ratelimit-limit-tokens"] == "40"
        wait_until(lambda: payments.request(DASHSCOPE, CHAT, claiming(99))[0] == 429, 10, mesh.logs)
        status, refused, _ = payments.request(DASHSCOPE, CHAT, {"app": "web", "x-user-id": "new"})
        assert status == 429 and refused["error"]["code"] == "rate_limit_exceeded", refused
        # another workload of the same namespace has its own budget
        status, _, headers = web.request(DASHSCOPE, CHAT)
        assert status == 200 and headers["x-ratelimit-limit-tokens"] == "40"
        # one count per workload (the key is logged hashed), whatever users and identities the requests claimed

        def keys_by_workload() -> dict[str, set[str]]:
            found: dict[str, set[str]] = {}
            for e in mesh.gateway.access_entries():
                if e["budget"] == f"{mesh.shop}/per-workload":
                    found.setdefault(e["caller"]["workload"], set()).add(e["budget_key"])
            return found

        wait_until(lambda: WEB_POD in keys_by_workload(), 10)
        counted = keys_by_workload()
        assert len(counted["payments"]) == 1 and counted["payments"] != counted[WEB_POD], counted
    finally:
        kube.run("delete", "llmtokenratelimit", "per-workload", "-n", mesh.shop)
    wait_until(lambda: model(payments) == "qwen-max", 15, mesh.logs)


def test_certificates_rotate_under_load_and_no_request_is_lost(mesh):
    statuses: dict[str, list[int]] = {"payments": [], "web": []}
    stop = threading.Event()

    def load(name: str, envoy: SidecarEnvoy) -> None:
        while not stop.is_set():
            statuses[name].append(envoy.request(DASHSCOPE, CHAT)[0])

    def serial() -> str:
        certs = json.loads(admin(mesh.payments.admin, "/certs"))["certificates"]
        return next(chain["serial_number"] for c in certs for chain in c.get("cert_chain", [])
                    if any("spiffe://" in san.get("uri", "") for san in chain["subject_alt_names"]))

    handshakes_before = handshakes(mesh)
    serials = {serial()}
    threads = [threading.Thread(target=load, args=item) for item in (("payments", mesh.payments), ("web", mesh.web))]
    for thread in threads:
        thread.start()
    try:
        # through three renewals of the sidecars' certificates (every TTL_S / 2)
        wait_until(lambda: serials.add(serial()) or len(serials) >= 4, 6 * TTL_S, lambda: str(serials), interval=0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    sent = statuses["payments"] + statuses["web"]
    assert len(statuses["payments"]) >= 10 and len(statuses["web"]) >= 10, {k: len(v) for k, v in statuses.items()}
    assert set(sent) == {200}, [s for s in sent if s != 200]
    # the renewed certificates were used: the sidecars made new connections, each with its current one
    assert handshakes(mesh) - handshakes_before >= 2
    # and the gateway's requests were decided as before, for the same workloads
    recent = mesh.gateway.access_entries()[-10:]
    assert {e["caller"]["workload"] for e in recent} <= {"payments", WEB_POD} and all(
        e["status"] == 200 for e in recent)
