"""The egress gateway with two real Envoys on this machine: a "sidecar" (`extproc serve` for the
mesh, and an Envoy on the `envoy-config --sidecar` bootstrap) and an "egress gateway" (`extproc up
--gateway`, its own config, its own ports). A route bound to the gateway is sent by the sidecar,
as plain HTTP with its Host header, to the gateway, which alone injects the key and originates
TLS; a route of the mesh is still decided by the sidecar. The sidecar's control plane holds a
decoy key for the gateway's provider: if the sidecar ever decided that host, the provider would
see the decoy."""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from extproc.ops.up import envoy_binary
from support.auth_helpers import TokenFiles, token_files
from support.egress_gateway import DECOY, GATEWAY, gateway_bound_config
from support.helpers import CHAT, free_port, start_gateway, upstream_args, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"


class Sidecar:
    """`extproc serve` (the mesh's control plane) and an Envoy on the sidecar bootstrap."""

    def __init__(self, tmp_path: Path, config: Path, env: dict[str, str], extra: list[str], control: int,
                 tokens: TokenFiles):
        self.control, self.ext_proc = control, free_port()
        self.listen, self.admin = free_port(), free_port()
        self.serve_log, self.envoy_log = tmp_path / "sidecar-serve.log", tmp_path / "sidecar-envoy.log"
        # the sidecar authenticates to its control plane over TCP
        self.serve = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--listen", f"127.0.0.1:{self.control}",
             "--ext-proc-listen", f"127.0.0.1:{self.ext_proc}", "--metrics", "none",
             "--auth-token-file", str(tokens.token_file), *extra],
            env={**os.environ, **env}, stdout=self.serve_log.open("wb"), stderr=subprocess.STDOUT)
        boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--sidecar",
                               "--control", f"127.0.0.1:{self.control}", "--ext-proc", f"127.0.0.1:{self.ext_proc}",
                               "--listen", f"127.0.0.1:{self.listen}", "--admin", f"127.0.0.1:{self.admin}",
                               "--access-log", "none", *tokens.envoy_config_args()],
                              capture_output=True, text=True, check=True).stdout
        (tmp_path / "sidecar.json").write_text(boot)
        self.envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "sidecar.json"), "--disable-hot-restart",
                                       "--concurrency", "1", "--log-level", "warning"],
                                      stdout=subprocess.DEVNULL, stderr=self.envoy_log.open("wb"))

    def logs(self) -> str:
        return self.serve_log.read_text(errors="replace") + self.envoy_log.read_text(errors="replace")

    def request(self, host: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict]:
        """As an application sends it once intercepted: plain HTTP, origin form, the LLM host in Host."""
        conn = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=30)
        try:
            conn.request("POST", "/", body=json.dumps(body), headers={"host": host, "content-type": "application/json",
                                                                      **(headers or {})})
            response = conn.getresponse()
            data = response.read()
            if response.getheader("content-type", "").startswith("text/event-stream"):
                return response.status, data.decode()
            return response.status, json.loads(data or b"null")
        finally:
            conn.close()

    def answers(self, host: str) -> bool:
        """Ready: the host answered 200 (Envoy up, its clusters and routes received)."""
        try:
            return self.request(host, CHAT)[0] == 200
        except OSError:
            return False

    def counters(self) -> dict[str, int]:
        lines = (line.partition(": ") for line in self.admin_get("/stats").splitlines())
        return {name: int(value) for name, _, value in lines if value.isdigit()}

    def admin_get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.admin, timeout=10)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def stop(self) -> None:
        for process in (self.envoy, self.serve):
            process.terminate()
        for process in (self.envoy, self.serve):
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture
def two_envoys(tmp_path, ca, fresh_providers, keys):
    """The sidecar and the gateway over mutual TLS, in local mode: the control plane (static token,
    its CA made at start) issues the sidecar's certificate and, to the gateway's Envoy presenting
    the operator's token, the gateway's own; the sidecar's identity is namespace `default`."""
    config = gateway_bound_config(tmp_path)
    upstream = upstream_args(ca, fresh_providers)
    control, tokens = free_port(), token_files(tmp_path)
    gateway = start_gateway(config, tmp_path, keys, [*upstream, "--gateway", GATEWAY, "--control-plane",
                                                     f"127.0.0.1:{control}", "--token-file", str(tokens.token_file)],
                            wait=False)
    # the mesh's control plane holds a decoy DashScope key: a key it must never need
    sidecar = Sidecar(tmp_path, config, {**keys, "YOUR_DASHSCOPE_API_KEY": DECOY},
                      [*upstream, "--egress-gateway", f"{GATEWAY}=127.0.0.1:{gateway.listen_port}"], control, tokens)
    try:
        wait_until(lambda: gateway.process.poll() is not None or "ready:" in gateway.log(), 40,
                   lambda: gateway.log() + sidecar.logs())
        assert gateway.process.poll() is None, gateway.log()
        yield gateway, sidecar
    finally:
        sidecar.stop()
        gateway.stop()


def test_sidecar_sends_gateway_bound_hosts_to_the_egress_gateway_which_alone_holds_the_key(two_envoys, fresh_providers,
                                                                                             keys):
    gateway, sidecar = two_envoys
    wait_until(lambda: sidecar.answers(MOONSHOT) and sidecar.answers(DASHSCOPE), 30, sidecar.logs, interval=0.2)
    for fake in fresh_providers.values():
        fake.clear()
    before = sidecar.counters()
    gateway_before = len(gateway.access_entries())

    # the gateway-bound route, both rules, through the sidecar and the gateway
    status, answer = sidecar.request(DASHSCOPE, CHAT)
    assert status == 200 and answer["model"] == "qwen1.5-72b-chat", answer
    status, answer = sidecar.request(DASHSCOPE, CHAT, {"user-type": "subscriber"})
    assert status == 200 and answer["model"] == "qwen1.5-72b-chat"  # the vip rule, no route-specific config here
    dash = fresh_providers[DASHSCOPE].requests
    assert len(dash) == 2 and all(r.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
                                  for r in dash)
    assert all(r.sni == DASHSCOPE and r.path == "/compatible-mode/v1/chat/completions" for r in dash)
    # decided by the gateway: its access log names the route and the Host the sidecar kept
    wait_until(lambda: len(gateway.access_entries()) >= gateway_before + 2, 10)
    decided = gateway.access_entries()[gateway_before:]
    assert {(e["route"], e["host"]) for e in decided} == {("default/dashscope-route", DASHSCOPE)}
    # for the caller the sidecar's certificate names: the operator's Envoy, in namespace default
    assert all(e["caller"] == {"namespace": "default", "service_account": "local"} for e in decided), decided
    assert {e["rule"] for e in decided} == {"vip-route", "rules[1]"}
    # a streamed answer comes through both Envoys as events, and the gateway counts its tokens
    status, events = sidecar.request(DASHSCOPE, {**CHAT, "stream": True})
    assert status == 200 and events.rstrip().endswith("data: [DONE]") and '"usage"' in events, events
    tokens = ("gen_ai_client_token_usage_count", frozenset({
        ("gen_ai_operation_name", "chat"), ("gen_ai_provider_name", DASHSCOPE),
        ("gen_ai_request_model", "qwen1.5-72b-chat"), ("gen_ai_response_model", "qwen1.5-72b-chat"),
        ("llm_route", "default/dashscope-route"), ("llm_rule", "rules[1]"),
        ("llm_provider", "default/dashscope-qwen"), ("gen_ai_token_type", "output")}))
    wait_until(lambda: gateway.metrics().get(tokens, 0) >= 2, 10, lambda: str(gateway.metrics()))

    # a host of the mesh (no route binds Moonshot elsewhere) is still decided by the sidecar itself
    status, answer = sidecar.request(MOONSHOT, CHAT)
    assert status == 200 and answer["model"] == "moonshot-v1-8k"
    (moon,) = fresh_providers[MOONSHOT].requests
    assert moon.headers["authorization"] == f"Bearer {keys['YOUR_MOONSHOT_API_KEY']}"
    assert not [e for e in gateway.access_entries() if e["provider"] == "default/moonshot"]
    # the gateway takes nothing from a client without a certificate of the mesh: no answer at all
    for host in (MOONSHOT, DASHSCOPE):
        with pytest.raises((ConnectionError, http.client.HTTPException)):
            gateway.request(host, CHAT, proxy_form=False)
    assert len(fresh_providers[DASHSCOPE].requests) == 2 + 1  # the sidecar's three, nothing more

    # the decoy never left the sidecar's control plane; no provider got a key from anyone else
    for fake in fresh_providers.values():
        for recorded in fake.requests:
            assert DECOY not in json.dumps(recorded.headers) + json.dumps(recorded.body)
            assert recorded.headers["authorization"] in {f"Bearer {k}" for k in keys.values()}

    # the sidecar's Envoy: the gateway's cluster, no DashScope cluster, no key anywhere in its config
    dump = sidecar.admin_get("/config_dump?include_eds")
    assert "llm_egress_llm-gateway_egress" in dump and "llm_provider_dashscope_aliyuncs_com" not in dump
    assert "llm_provider_api_moonshot_cn" in dump
    assert all(secret not in dump for secret in (DECOY, *keys.values()))
    after = sidecar.counters()
    # its ext_proc was asked about Moonshot only: the gateway-bound requests passed it by
    assert (after["http.llm_gateway.ext_proc.request.streams_started"]
            - before["http.llm_gateway.ext_proc.request.streams_started"]) == 1
    assert (after["cluster.llm_egress_llm-gateway_egress.upstream_rq_200"]
            - before["cluster.llm_egress_llm-gateway_egress.upstream_rq_200"]) == 3
    # every request to the gateway on one mutual-TLS connection, HTTP/2: no handshake per request
    egress = "cluster.llm_egress_llm-gateway_egress."
    assert (after[egress + "upstream_cx_http2_total"], after[egress + "upstream_cx_active"],
            after[egress + "upstream_cx_destroy"]) == (1, 1, 0)
    assert after[egress + "upstream_rq_total"] >= 4  # the first answer awaited, then three
    gateway_stats = {name: int(value) for name, _, value in (
        line.partition(": ") for line in gateway.admin("/stats").splitlines()) if value.isdigit()}
    assert sum(v for k, v in gateway_stats.items() if k.startswith("listener.") and k.endswith(".ssl.handshake")) == 1


def test_validate_and_route_on_the_command_line(tmp_path, keys):
    config = gateway_bound_config(tmp_path)

    def extproc(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True,
                              env={**os.environ, **keys}, timeout=30)

    unknown = extproc("validate", str(config))
    assert unknown.returncode == 1 and "Traceback" not in unknown.stderr
    assert (f"{config / '02-LLMRoute.yaml'}: LLMRoute default/dashscope-route: spec.gateways[0]: no egress gateway "
            f"{GATEWAY} is known (known: none; declare one with --egress-gateway)") in unknown.stderr
    assert extproc("validate", str(config), "--egress-gateway", GATEWAY).returncode == 0
    assert extproc("validate", str(config), "--gateway", GATEWAY).returncode == 0
    bad = extproc("validate", str(config), "--egress-gateway", "egress")
    assert bad.returncode == 2 and "'egress' is not NAMESPACE/NAME" in bad.stderr

    mesh = extproc("route", "--config", str(config), "--host", DASHSCOPE,
                   "--egress-gateway", f"{GATEWAY}=10.1.2.3:8080")
    assert mesh.returncode == 0, mesh.stderr
    assert f"decided by the egress gateway {GATEWAY}: the sidecars send it to 10.1.2.3:8080" in mesh.stdout
    there = extproc("route", "--config", str(config), "--host", DASHSCOPE, "--gateway", GATEWAY,
                    "-H", "user-type: subscriber")
    assert (there.returncode == 0 and "rule: vip-route" in there.stdout
            and "provider default/dashscope-qwen" in there.stdout)
    assert all(key not in mesh.stdout + there.stdout for key in keys.values())


def test_a_host_moves_between_the_mesh_and_the_gateway_while_running(two_envoys, fresh_providers, keys, tmp_path):
    """Binding Moonshot's host to the gateway, then unbinding it: the sidecar follows each change
    (routes over RDS, the gateway's cluster over CDS) and the key goes where the decision is."""
    gateway, sidecar = two_envoys
    wait_until(lambda: sidecar.answers(MOONSHOT) and sidecar.answers(DASHSCOPE), 30, sidecar.logs, interval=0.2)
    moon_route = tmp_path / "config" / "07-moonshot-route.yaml"
    moon_route.write_text(f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: moonshot-route
spec:
  host: {MOONSHOT}
  gateways: [{GATEWAY}]
  rules:
  - backendRefs:
    - providerHost: {MOONSHOT}
""")

    def gateway_sent_to_moonshot() -> int:
        stats = (line.partition(": ") for line in gateway.admin("/stats").splitlines())
        return next((int(v) for name, _, v in stats
                     if name == "cluster.llm_provider_api_moonshot_cn.upstream_rq_200"), 0)

    def decided_by_gateway() -> bool:
        before = gateway_sent_to_moonshot()
        return sidecar.answers(MOONSHOT) and gateway_sent_to_moonshot() == before + 1

    wait_until(decided_by_gateway, 20, sidecar.logs, interval=0.3)
    assert "llm_provider_api_moonshot_cn" not in sidecar.admin_get("/config_dump")  # the sidecar no longer needs it
    fresh_providers[MOONSHOT].clear()
    assert sidecar.answers(MOONSHOT)
    assert fresh_providers[MOONSHOT].requests[-1].headers["authorization"] == f"Bearer {keys['YOUR_MOONSHOT_API_KEY']}"

    moon_route.unlink()  # back to the mesh
    wait_until(lambda: ("llm_provider_api_moonshot_cn" in sidecar.admin_get("/config_dump")
                        and sidecar.answers(MOONSHOT)),
               20, sidecar.logs, interval=0.3)
    # the gateway drops its own Moonshot cluster in its own time (its counter then reads 0), so the proof
    # is the sidecar's: its ext_proc decided, and its own Moonshot cluster carried the request
    direct = "cluster.llm_provider_api_moonshot_cn.upstream_rq_200"
    started = sidecar.counters()
    assert sidecar.answers(MOONSHOT)
    after = sidecar.counters()
    assert (after["http.llm_gateway.ext_proc.request.streams_started"]
            == started["http.llm_gateway.ext_proc.request.streams_started"] + 1)
    assert after[direct] == started.get(direct, 0) + 1
    assert after.get("cluster.llm_egress_llm-gateway_egress.upstream_rq_200", 0) == \
        started.get("cluster.llm_egress_llm-gateway_egress.upstream_rq_200", 0)
