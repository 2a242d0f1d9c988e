"""Transparent interception, as in a pod with the sidecar: a network namespace made by the test,
its outbound TCP port 80 redirected to Envoy with iptables (Envoy's own traffic excluded by its
user id, as Istio's init container does). The seed's plain curl, with no proxy option, gets the
provider's answer, Envoy having found the provider by name (system resolver, the pod's hosts
file) on port 443; a request to a host that is not an LLM host reaches that host unchanged.

Needs root, iproute2, iptables and util-linux's setpriv (`.ci/run` installs iptables)."""

from __future__ import annotations

import http.server
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from extproc.demo.fake_provider import FakeProvider
from extproc.ops.up import envoy_binary
from support.auth_helpers import ext_proc_client, token_files
from support.helpers import SEED_MANIFESTS, free_port, wait_until


def _free_subnet() -> str:
    """A /24 of 198.18.0.0/15 (the benchmarking range) that no route of this machine uses: test runs
    side by side (several worktrees) each get their own pod network."""
    routes = subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
    for _ in range(64):
        subnet = f"198.{secrets.choice((18, 19))}.{secrets.randbelow(256)}"
        if f"{subnet}." not in routes:
            return subnet
    raise RuntimeError(f"no free /24 in 198.18.0.0/15:\n{routes}")


SUBNET = _free_subnet()
HOST_IP, POD_IP = f"{SUBNET}.1", f"{SUBNET}.2"  # only in our namespace
ENVOY_UID = 1337
SEED_CURL_BODY = '{"messages": [{"role": "user", "content": "Please introduce yourself."}]}'


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, timeout=30)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(args)}: {result.stderr}")
    return result


class Recorder(http.server.BaseHTTPRequestHandler):
    """A plain HTTP service outside the pod: records what reaches it."""

    seen: list = []

    def log_message(self, *args) -> None:
        pass

    def _record(self) -> None:
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        Recorder.seen.append({"method": self.command, "path": self.path,
                              "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body})
        payload = b"plain service says hi"
        self.send_response(200)
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = do_PUT = _record


@pytest.fixture
def pod(tmp_path):
    """A namespace wired to this host by a veth pair, with the iptables redirect in place."""
    if os.geteuid() != 0:
        pytest.fail("interception tests need root (they make a network namespace)")
    for tool in ("ip", "iptables", "setpriv"):
        assert shutil.which(tool), f"{tool} is missing: apt-get install iproute2 iptables util-linux"
    routes = sh("ip", "route").stdout
    assert f"{SUBNET}." not in routes, f"{SUBNET}.0/24 is in use on this machine:\n{routes}"
    tag = secrets.token_hex(3)
    ns, host_if, pod_if = f"llmgw-{tag}", f"lgw{tag}h", f"lgw{tag}p"
    sh("ip", "netns", "add", ns)
    etc = Path("/etc/netns") / ns
    try:
        sh("ip", "link", "add", host_if, "type", "veth", "peer", "name", pod_if)
        sh("ip", "link", "set", pod_if, "netns", ns)
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", host_if)
        sh("ip", "link", "set", host_if, "up")
        inside = ["ip", "netns", "exec", ns]
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "addr", "add", f"{POD_IP}/24", "dev", pod_if)
        sh(*inside, "ip", "link", "set", pod_if, "up")
        sh(*inside, "ip", "route", "add", "default", "via", HOST_IP)
        # what the sidecar's init container does
        sh(*inside, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80",
           "-m", "owner", "--uid-owner", str(ENVOY_UID), "-j", "RETURN")
        sh(*inside, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80",
           "-d", "127.0.0.1/32", "-j", "RETURN")
        sh(*inside, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80", "-j", "REDIRECT",
           "--to-ports", "15001")
        etc.mkdir(parents=True)
        # the pod's name resolution (`ip netns exec` mounts this over /etc/hosts): the application
        # and Envoy both resolve the provider's name through it, as any program would
        (etc / "hosts").write_text(f"127.0.0.1 localhost\n{HOST_IP} dashscope.aliyuncs.com\n{HOST_IP} plain-service\n")
        yield ns
    finally:
        sh("ip", "netns", "del", ns, check=False)
        sh("ip", "link", "del", host_if, check=False)
        shutil.rmtree(etc, ignore_errors=True)


def start_sidecar_envoy(pod: str, shared: Path, control: int, ext_proc: int, creds, log: Path) -> subprocess.Popen:
    """The pod's sidecar Envoy, as Envoy's own user, from `envoy-config --sidecar` (the bootstrap
    in `shared`, readable by that user), reaching the control plane on the host side of the link."""
    boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--sidecar",
                           "--control", f"{HOST_IP}:{control}", "--ext-proc", f"{HOST_IP}:{ext_proc}",
                           *creds.envoy_config_args(),
                           "--listen", "0.0.0.0:15001", "--admin", "127.0.0.1:15000", "--access-log", "none"],
                          capture_output=True, check=True, text=True).stdout
    (shared / "envoy.json").write_text(boot)
    (shared / "envoy.json").chmod(0o644)
    return subprocess.Popen(
        ["ip", "netns", "exec", pod, "setpriv", f"--reuid={ENVOY_UID}", f"--regid={ENVOY_UID}", "--clear-groups",
         envoy_binary(), "-c", str(shared / "envoy.json"), "--disable-hot-restart", "--concurrency", "1",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=log.open("wb"))


def test_seed_curl_without_proxy_is_intercepted_and_other_traffic_passes(pod, ca, keys, tmp_path):
    shared = Path(tempfile.mkdtemp(prefix="llmgw-pod-"))  # readable by Envoy's own user
    shared.chmod(0o755)
    cert = ca.issue(["dashscope.aliyuncs.com"], stem="pod-dashscope")
    # on the provider's real port: Envoy finds it by name (the pod's hosts file) and port 443, no --resolve
    fake = FakeProvider("dashscope", cert.cert_file, cert.key_file, api_key=keys["YOUR_DASHSCOPE_API_KEY"],
                        host=HOST_IP, port=443).start()
    Recorder.seen = []
    plain = http.server.ThreadingHTTPServer((HOST_IP, 80), Recorder)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    ca_file = shared / "ca.crt"
    shutil.copy(ca.cert_file, ca_file)
    ca_file.chmod(0o644)
    control, ext_proc = free_port(), free_port()
    config = tmp_path / "config"
    config.mkdir()
    shutil.copy(SEED_MANIFESTS / "01-LLMProvider.yaml", config)
    # Envoy's token: readable by Envoy's user only (in a pod: mounted into Envoy's container only)
    creds = token_files(shared, uid=ENVOY_UID)
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--listen", f"{HOST_IP}:{control}",
         "--ext-proc-listen", f"{HOST_IP}:{ext_proc}", "--auth-token-file", str(creds.token_file),
         "--metrics", "none", "--upstream-ca", str(ca_file)],
        env={**os.environ, **keys}, stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    envoy_log = tmp_path / "envoy.log"
    envoy = start_sidecar_envoy(pod, shared, control, ext_proc, creds, envoy_log)

    def in_pod(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", pod, *args], capture_output=True, text=True, timeout=30)

    try:
        # the seed's own command, as typed in the sleep pod: no proxy option, plain HTTP
        seed_curl = ["curl", "-sS", "http://dashscope.aliyuncs.com", "-H", "Content-Type: application/json",
                     "--data", SEED_CURL_BODY]
        wait_until(lambda: '"model": "qwen1.5-72b-chat"' in in_pod(*seed_curl).stdout, 20,
                   lambda: f"{in_pod(*seed_curl)}\n{envoy_log.read_text()}\n{(tmp_path / 'serve.log').read_text()}")
        answer = json.loads(in_pod(*seed_curl).stdout)
        assert answer["object"] == "chat.completion" and answer["model"] == "qwen1.5-72b-chat"
        seen = fake.requests[-1]
        assert seen.sni == "dashscope.aliyuncs.com" and seen.path == "/compatible-mode/v1/chat/completions"
        assert seen.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"

        # a host that is no LLM host: through Envoy, on to where the application sent it, unchanged
        provider_requests = len(fake.requests)
        result = in_pod("curl", "-sS", "-X", "PUT", "http://plain-service/some/path?q=1", "-H", "x-custom: kept",
                        "-H", "authorization: Bearer app-own", "--data-binary", "raw body, not JSON")
        assert result.stdout == "plain service says hi", result.stderr
        (request,) = Recorder.seen
        assert request["method"] == "PUT" and request["path"] == "/some/path?q=1"
        assert request["body"] == b"raw body, not JSON"
        assert request["headers"]["host"] == "plain-service"
        # only what any HTTP proxy adds (and Istio's sidecars add too)
        assert set(request["headers"]) <= {"host", "user-agent", "accept", "x-custom", "authorization",
                                           "content-length", "content-type", "x-forwarded-proto"}, request["headers"]
        assert request["headers"]["x-custom"] == "kept"
        assert request["headers"]["authorization"] == "Bearer app-own"  # never replaced by a provider key
        assert not any(k.lower().startswith("x-llm-gateway") for k in request["headers"])
        assert len(fake.requests) == provider_requests  # the plain request did not go to the provider

        # issue 15: a process in the pod that is not Envoy gets no key from anything it can reach
        app = ["ip", "netns", "exec", pod, "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
        for target in (f"{HOST_IP}:{ext_proc}", f"{HOST_IP}:{control}"):
            got = ext_proc_client(target, "dashscope.aliyuncs.com", prefix=app)
            assert got["code"] in ("UNAUTHENTICATED", "UNIMPLEMENTED") and got["authorization"] is None, (target, got)
        assert (ext_proc_client(f"{HOST_IP}:{ext_proc}", "dashscope.aliyuncs.com", prefix=app)["code"]
                == "UNAUTHENTICATED")
        read = subprocess.run([*app, "cat", str(creds.token_file)], capture_output=True, text=True, timeout=30)
        assert read.returncode != 0 and creds.token not in read.stdout
        dump = subprocess.run([*app, "curl", "-sS", "http://127.0.0.1:15000/config_dump?include_eds"],
                              capture_output=True, text=True, timeout=30).stdout
        assert "llm_gateway_control_token" in dump  # the admin answered; its dump holds neither secret
        assert creds.token not in dump and keys["YOUR_DASHSCOPE_API_KEY"] not in dump
        # the same client with Envoy's token works: the refusals above are the authentication's
        assert ext_proc_client(f"{HOST_IP}:{ext_proc}", "dashscope.aliyuncs.com", creds.token)["authorization"] == \
            f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
        # the readiness probe: a listener of Envoy's own (the admin interface stays on loopback)
        probe = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}"]
        assert in_pod(*probe, "http://127.0.0.1:15021/ready").stdout == "200"
        assert in_pod(*probe, "http://127.0.0.1:15021/stats").stdout == "404"
        in_pod("curl", "-s", "-X", "POST", "http://127.0.0.1:15000/healthcheck/fail")  # as the preStop drain does
        assert in_pod(*probe, "http://127.0.0.1:15021/ready").stdout == "503"
    finally:
        envoy.terminate()
        serve.terminate()
        envoy.wait(10)
        serve.wait(10)
        plain.shutdown()
        plain.server_close()
        fake.stop()
        shutil.rmtree(shared, ignore_errors=True)


def test_seed_curl_in_gateway_mode_reaches_the_provider_through_the_egress_gateway(pod, ca, keys, tmp_path):
    """The same pod, the seed's route bound to an egress gateway outside the pod: the sidecar sends
    the seed's plain curl to the gateway, which alone holds the key. The pod's control plane holds
    a decoy key; neither the provider nor the pod's Envoy (its config dump) ever sees a key from it."""
    from support.egress_gateway import DECOY, GATEWAY, gateway_bound_config

    shared = Path(tempfile.mkdtemp(prefix="llmgw-pod-"))  # readable by Envoy's own user
    shared.chmod(0o755)
    cert = ca.issue(["dashscope.aliyuncs.com"], stem="pod-gw-dashscope")
    fake = FakeProvider("dashscope", cert.cert_file, cert.key_file, api_key=keys["YOUR_DASHSCOPE_API_KEY"],
                        host=HOST_IP, port=443).start()
    config = gateway_bound_config(tmp_path)
    (config / "04-LLMProvider-moonshot.yaml").unlink()
    gateway_port, control, ext_proc = free_port(), free_port(), free_port()
    # the pod's control plane: a decoy key, and where the egress gateway is; authenticated, as in
    # the sidecar-deciding mode (Envoy's token readable by Envoy's user only)
    creds = token_files(shared, uid=ENVOY_UID)
    # the egress gateway, outside the pod: its own config, key and ports; it finds the provider at
    # the host side of the pod's link, and takes mutual TLS with certificates the pod's control
    # plane issues (its Envoy presents the operator's token there)
    gateway = subprocess.Popen(
        [sys.executable, "-m", "extproc", "up", "--config", str(config), "--gateway", GATEWAY,
         "--listen", f"{HOST_IP}:{gateway_port}", "--admin", f"127.0.0.1:{free_port()}", "--metrics", "none",
         "--access-log", str(tmp_path / "gateway-access.log"), "--concurrency", "1",
         "--upstream-ca", str(ca.cert_file), "--resolve", f"dashscope.aliyuncs.com={HOST_IP}:443",
         "--control-plane", f"{HOST_IP}:{control}", "--token-file", str(creds.token_file)],
        env={**os.environ, **keys}, stdout=(tmp_path / "gateway.log").open("wb"), stderr=subprocess.STDOUT)
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--listen", f"{HOST_IP}:{control}",
         "--ext-proc-listen", f"{HOST_IP}:{ext_proc}", "--metrics", "none", "--upstream-ca", str(ca.cert_file),
         "--auth-token-file", str(creds.token_file), "--egress-gateway", f"{GATEWAY}={HOST_IP}:{gateway_port}"],
        env={**os.environ, **keys, "YOUR_DASHSCOPE_API_KEY": DECOY},
        stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    envoy_log = tmp_path / "envoy.log"
    envoy = start_sidecar_envoy(pod, shared, control, ext_proc, creds, envoy_log)

    def in_pod(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", pod, *args], capture_output=True, text=True, timeout=30)

    def logs() -> str:
        return "\n".join(p.read_text(errors="replace")
                         for p in (envoy_log, tmp_path / "serve.log", tmp_path / "gateway.log"))

    try:
        seed_curl = ["curl", "-sS", "http://dashscope.aliyuncs.com", "-H", "Content-Type: application/json",
                     "--data", SEED_CURL_BODY]
        wait_until(lambda: '"model": "qwen1.5-72b-chat"' in in_pod(*seed_curl).stdout, 30,
                   lambda: f"{in_pod(*seed_curl)}\n{logs()}", interval=0.2)
        answer = json.loads(in_pod(*seed_curl).stdout)
        assert answer["object"] == "chat.completion" and answer["model"] == "qwen1.5-72b-chat"
        assert fake.requests and all(
            r.sni == "dashscope.aliyuncs.com"
            and r.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
            for r in fake.requests)
        # decided by the gateway, from the Host the sidecar kept
        entries = [json.loads(line) for line in (tmp_path / "gateway-access.log").read_text().splitlines() if line]
        assert {(e["route"], e["host"]) for e in entries if e["status"] == 200} == {
            ("default/dashscope-route", "dashscope.aliyuncs.com")}
        # the pod's Envoy: asked the pod's admin from inside the pod, no key of any kind
        dump = in_pod("curl", "-sS", "http://127.0.0.1:15000/config_dump?include_eds").stdout
        assert "llm_egress_llm-gateway_egress" in dump and "llm_provider_dashscope_aliyuncs_com" not in dump
        assert all(secret not in dump for secret in (DECOY, *keys.values()))
        stats = in_pod("curl", "-sS", "http://127.0.0.1:15000/stats").stdout
        assert "http.llm_gateway.ext_proc.request.streams_started: 0" in stats or \
            "http.llm_gateway.ext_proc.request.streams_started" not in stats  # the pod's ext_proc was never asked
        # the pod's Envoy reached the gateway over mutual TLS; the pod's own application, going to
        # the gateway's address itself (as a pod without a sidecar would), gets nothing
        sent = len(fake.requests)
        for scheme in ("http", "https"):
            direct = in_pod("curl", "-sS", "-k", "--max-time", "10", f"{scheme}://{HOST_IP}:{gateway_port}/",
                            "-H", "Host: dashscope.aliyuncs.com", "-H", "Content-Type: application/json",
                            "--data", SEED_CURL_BODY)
            assert direct.returncode != 0 and direct.stdout == "", (scheme, direct)
        assert len(fake.requests) == sent
    finally:
        for process in (envoy, serve, gateway):
            process.terminate()
        for process in (envoy, serve, gateway):
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        fake.stop()
        shutil.rmtree(shared, ignore_errors=True)
