"""The command line as a user runs it: validate, route, envoy-config, up's failures, and the demo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

from extproc.demo.fake_provider import fake_embedding
from support.helpers import CHAT, REPO, SEED_MANIFESTS, Gateway, free_port, wait_until


def extproc(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "extproc", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)


def test_validate_accepts_seed_and_names_file_object_field_of_errors(tmp_path, keys):
    ok = extproc("validate", str(SEED_MANIFESTS), env=keys)
    assert ok.returncode == 0, ok.stderr
    assert "ok: 2 LLMProvider, 2 LLMRoute" in ok.stdout

    bad = tmp_path / "bad.yaml"
    bad.write_text((SEED_MANIFESTS / "06-LLMRoute-weighted.yaml").read_text().replace("weight: 50", "weight: -5"))
    result = extproc("validate", str(bad), env=keys)
    assert result.returncode == 1
    assert f"{bad}: LLMRoute default/demo-llm-server: spec.rules[0].backendRefs[0].weight" in result.stderr
    assert "Traceback" not in result.stderr

    unset_file = tmp_path / "unset.yaml"
    unset_file.write_text((SEED_MANIFESTS / "01-LLMProvider.yaml").read_text()
                          .replace("YOUR_DASHSCOPE_API_KEY", "LLM_GATEWAY_TEST_UNSET_KEY"))
    unset = extproc("validate", str(unset_file))
    assert unset.returncode == 1
    assert f"{unset_file}: LLMProvider default/dashscope-qwen: spec.configs.defaultConfig.openAIConfig.apiKey: " \
           "environment variable LLM_GATEWAY_TEST_UNSET_KEY is not set" in unset.stderr


def test_route_dry_run(keys):
    vip = extproc("route", "--config", str(SEED_MANIFESTS), "--host", "dashscope.aliyuncs.com",
                  "-H", "user-type: subscriber", env=keys)
    assert vip.returncode == 0, vip.stderr
    assert "rule: vip-route" in vip.stdout and "model qwen-turbo" in vip.stdout
    assert "cluster llm_provider_dashscope_aliyuncs_com" in vip.stdout
    split = extproc("route", "--config", str(SEED_MANIFESTS), "--host", "demo-llm-server.default.svc", env=keys)
    assert " 50.0%  provider default/dashscope-qwen" in split.stdout
    assert " 50.0%  provider default/moonshot" in split.stdout
    assert keys["YOUR_DASHSCOPE_API_KEY"] not in vip.stdout + split.stdout
    none = extproc("route", "--config", str(SEED_MANIFESTS), "--host", "example.com", env=keys)
    assert none.returncode == 1 and "404" in none.stdout


def test_envoy_config_is_valid_for_envoy_and_holds_no_key(tmp_path, keys):
    from extproc.ops.up import envoy_binary

    result = extproc("envoy-config", "--control", "extproc.llm-gateway.svc:18000", env=keys)
    assert result.returncode == 0
    boot = json.loads(result.stdout)
    assert all(key not in result.stdout for key in keys.values())
    (tmp_path / "envoy.json").write_text(result.stdout)
    check = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(tmp_path / "envoy.json")],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    control = boot["static_resources"]["clusters"][0]
    assert control["type"] == "STRICT_DNS"


def test_committed_envoy_bootstrap_matches_generator():
    """envoy/bootstrap.json is what `extproc envoy-config` prints with its defaults."""
    result = extproc("envoy-config")
    assert result.returncode == 0
    assert json.loads((REPO / "envoy" / "bootstrap.json").read_text()) == json.loads(result.stdout), \
        "regenerate with: python -m extproc envoy-config > envoy/bootstrap.json"


def test_up_refuses_bad_config_and_busy_port(tmp_path, keys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: LLMRoute\napiVersion: istio.alibabacloud.com/v1beta1\nmetadata: {name: r}\nspec: {host: x}\n")
    result = extproc("up", "--config", str(bad), "--listen", f"127.0.0.1:{free_port()}",
                     "--admin", f"127.0.0.1:{free_port()}", env=keys)
    assert result.returncode == 1
    assert f"{bad}: LLMRoute default/r: spec.rules: required field is missing" in result.stderr
    assert "Traceback" not in result.stderr

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = extproc("up", "--config", str(SEED_MANIFESTS), "--listen", f"127.0.0.1:{port}",
                         "--admin", f"127.0.0.1:{free_port()}", env=keys, timeout=60)
    assert result.returncode == 1
    # said before Envoy is started (docs/scaling.md, No orphans)
    assert f"--listen 127.0.0.1:{port}: the port is in use" in result.stderr and "Traceback" not in result.stderr


def test_every_listening_flag_is_checked_before_anything_starts(tmp_path, keys):
    """A busy --metrics port is named by its flag, before the ext_proc, xDS or Envoy start
    (it used to fail after the gRPC servers had started, with a message naming no flag)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = extproc("up", "--config", str(SEED_MANIFESTS), "--listen", f"127.0.0.1:{free_port()}",
                         "--admin", f"127.0.0.1:{free_port()}", "--metrics", f"127.0.0.1:{port}", env=keys, timeout=60)
        serve = extproc("serve", "--config", str(SEED_MANIFESTS), "--socket-dir", str(tmp_path / "sockets"),
                        "--metrics", f"127.0.0.1:{port}", env=keys, timeout=60)
    for failed in (result, serve):
        assert failed.returncode == 1, failed.stderr
        assert f"--metrics 127.0.0.1:{port}: the port is in use by another process" in failed.stderr
        assert "listening on" not in failed.stderr and "Traceback" not in failed.stderr


def test_no_envoy_noise_at_start_and_reload(tmp_path, keys, providers, ca):
    """Envoy says nothing at start and on a reload of a config with `retries` but what an
    operator can act on: no work-in-progress notices about the gateway's own config, no
    deprecated field (three 600-character warnings per reload before)."""
    from support.helpers import seed_dir, start_gateway, upstream_args

    config = seed_dir(tmp_path, "01", "04", "05", "06")
    route = (config / "06-LLMRoute-weighted.yaml").read_text()
    gw = start_gateway(config, tmp_path, keys, upstream_args(ca, providers))
    try:
        (config / "06-LLMRoute-weighted.yaml").write_text(route + "    retries: {attempts: 1}\n")
        wait_until(lambda: gw.log().count("config reloaded") == 1, 15, gw.log)
        assert gw.request("demo-llm-server", CHAT).status == 200  # the failover route is in force
        envoy_warnings = [line for line in gw.log().splitlines() if "][warning][" in line or "][error][" in line]
        # what remains is Envoy's advice on connection limits, about its own listener
        assert all("global_downstream_max_connections" in line for line in envoy_warnings), envoy_warnings
        assert "work-in-progress" not in gw.log() and "Deprecated field" not in gw.log()
    finally:
        gw.stop()


def test_demo_serves_the_three_scenarios_and_stops_cleanly(tmp_path):
    listen, admin = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if "API_KEY" not in k}
    log = tmp_path / "demo.log"
    process = subprocess.Popen([sys.executable, "-m", "extproc", "demo", "--listen", f"127.0.0.1:{listen}",
                                "--admin", f"127.0.0.1:{admin}"],
                               stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
    gw = Gateway(process, listen, admin, log)
    try:
        wait_until(lambda: "Ctrl-C stops it." in gw.log() or process.poll() is not None, 30, gw.log)
        assert process.poll() is None, gw.log()
        assert f"curl -x http://127.0.0.1:{listen} http://dashscope.aliyuncs.com" in gw.log()
        assert gw.request("dashscope.aliyuncs.com", CHAT).json()["model"] == "qwen1.5-72b-chat"
        assert gw.request("dashscope.aliyuncs.com", CHAT, {"user-type": "subscriber"}).json()["model"] == "qwen-turbo"
        models = {gw.request("demo-llm-server", CHAT).json()["model"] for _ in range(40)}
        assert models == {"qwen1.5-72b-chat", "moonshot-v1-8k"}
        assert "llm_provider_api_moonshot_cn.upstream_rq_200" in gw.admin("/stats")
        # the OpenAI base-URL examples it prints
        assert "http://dashscope.aliyuncs.com/compatible-mode/v1/embeddings" in gw.log()
        embedded = gw.request("dashscope.aliyuncs.com", {"model": "text-embedding-v3", "input": "Hi"},
                              path="/compatible-mode/v1/embeddings")
        assert embedded.json()["data"][0]["embedding"] == fake_embedding("Hi"), embedded.body
        listing = gw.request("demo-llm-server", None, method="GET", path="/v1/models").json()
        assert [m["id"] for m in listing["data"]] == ["qwen1.5-72b-chat", "moonshot-v1-8k"]
        # the data-protection examples it prints: masked (the fake echoes what it got), refused
        assert "x-fake-echo: 1" in gw.log()
        echoed = gw.request("dashscope.aliyuncs.com", {"messages": [
            {"role": "user", "content": "Card 4111 1111 1111 1111, mail jane@example.com"}]}, {"x-fake-echo": "1"})
        assert echoed.json()["choices"][0]["message"]["content"] == "Card [BANK-CARD], mail [EMAIL]"
        refused = gw.request("dashscope.aliyuncs.com", {"messages": [
            {"role": "user", "content": "my key is sk-0123456789abcdef0123456789"}]})
        assert (refused.status, refused.json()["error"]["code"]) == (400, "content_policy_violation")
        # ... and the answer's, streamed: the card masked on its way back
        assert "x-fake-reply: Your card 4111 1111 1111 1111 is on file" in gw.log()
        streamed = gw.request("dashscope.aliyuncs.com", {"messages": [{"role": "user", "content": "Which card?"}],
                                                         "stream": True},
                              {"x-fake-reply": "Your card 4111 1111 1111 1111 is on file"})
        text = "".join(c["delta"].get("content") or "" for block in streamed.body.decode().split("\n\n")
                       if block.startswith("data: {") for c in json.loads(block[6:])["choices"])
        assert text == "Your card [BANK-CARD] is on file "
        # providers of other APIs (docs/translation.md): the examples it prints, answered
        assert f"curl -x http://127.0.0.1:{listen} http://demo-any-api/v1/messages" in gw.log()
        translated = gw.request("api.anthropic.com", CHAT, path="/v1/chat/completions").json()
        assert translated["model"] == "claude-sonnet-4-5" and translated["object"] == "chat.completion"
        message = {"model": "any", "max_tokens": 100, "messages": [{"role": "user", "content": "Hi"}]}
        served = {gw.request("demo-any-api", message, path="/v1/messages").json()["model"] for _ in range(60)}
        assert served == {"qwen1.5-72b-chat", "claude-sonnet-4-5", "gemini-2.5-flash",
                          "anthropic.claude-3-5-haiku-20241022-v1:0", "gpt-4o"}
        # in-cluster model servers (simulated), picked by load, beside DashScope by weight
        assert "http://qwen.local" in gw.log() and "extproc route --config" in gw.log()
        local = [gw.request("qwen.local", {"model": "base-model", **CHAT}) for _ in range(20)]
        assert all(r.status == 200 for r in local)
        assert {r.headers.get("x-model-server") for r in local} & {"ms0", "ms1", "ms2"}
        process.send_signal(signal.SIGINT)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
