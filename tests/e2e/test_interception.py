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
from extproc.runner import envoy_binary
from helpers import SEED_MANIFESTS, free_port, wait_until

HOST_IP, POD_IP = "198.51.100.1", "198.51.100.2"  # TEST-NET-2, only in our namespace
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
        Recorder.seen.append({"method": self.command, "path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()},
                              "body": body})
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
    assert "198.51.100." not in routes, f"198.51.100.0/24 is in use on this machine:\n{routes}"
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
        sh(*inside, "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "tcp", "--dport", "80", "-d", "127.0.0.1/32", "-j", "RETURN")
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
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--listen", f"{HOST_IP}:{control}",
         "--ext-proc-listen", f"{HOST_IP}:{ext_proc}",
         "--metrics", "none", "--upstream-ca", str(ca_file)],
        env={**os.environ, **keys}, stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT)
    boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--sidecar", "--control", f"{HOST_IP}:{control}",
                           "--ext-proc", f"{HOST_IP}:{ext_proc}",
                           "--listen", "0.0.0.0:15001", "--admin", "127.0.0.1:15000", "--access-log", "none"],
                          capture_output=True, check=True, text=True).stdout
    (shared / "envoy.json").write_text(boot)
    (shared / "envoy.json").chmod(0o644)
    envoy_log = tmp_path / "envoy.log"
    envoy = subprocess.Popen(
        ["ip", "netns", "exec", pod, "setpriv", f"--reuid={ENVOY_UID}", f"--regid={ENVOY_UID}", "--clear-groups",
         envoy_binary(), "-c", str(shared / "envoy.json"), "--disable-hot-restart", "--concurrency", "1",
         "--log-level", "warning"],
        stdout=subprocess.DEVNULL, stderr=envoy_log.open("wb"))

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
        assert set(request["headers"]) <= {"host", "user-agent", "accept", "x-custom", "authorization", "content-length",
                                           "content-type", "x-forwarded-proto"}, request["headers"]
        assert request["headers"]["x-custom"] == "kept"
        assert request["headers"]["authorization"] == "Bearer app-own"  # never replaced by a provider key
        assert not any(k.lower().startswith("x-llm-gateway") for k in request["headers"])
        assert len(fake.requests) == provider_requests  # the plain request did not go to the provider

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
