"""Config changes under a running gateway: good ones take effect, bad ones never replace a good one."""

from __future__ import annotations

import shutil
import threading

from support.helpers import CHAT, add_seed, seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"


def test_in_flight_request_survives_change_and_provider_removal(tmp_path, gateway_factory, fresh_providers):
    config = seed_dir(tmp_path, "01", "04")
    gw = gateway_factory(config)
    from support.helpers import Gateway
    slow = Gateway(gw.process, gw.listen_port, gw.admin_port, gw.log_file)  # its own connection
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault(
        "resp", slow.request(MOONSHOT, CHAT, {"x-fake-delay": "3"})))
    thread.start()
    wait_until(lambda: fresh_providers[MOONSHOT].requests, 5)  # the request is at the provider now
    (config / "04-LLMProvider-moonshot.yaml").unlink()  # the provider and its cluster go away
    wait_until(lambda: gw.request(MOONSHOT, CHAT).status == 404, 10, lambda: gw.log())
    thread.join(10)
    assert result["resp"].status == 200, result["resp"].body
    assert result["resp"].json()["model"] == "moonshot-v1-8k"
    assert gw.request(DASHSCOPE, CHAT).status == 200


def test_bad_config_keeps_last_good_and_fix_recovers(tmp_path, gateway_factory):
    config = seed_dir(tmp_path, "01")
    gw = gateway_factory(config)
    provider = config / "01-LLMProvider.yaml"
    good = provider.read_text()

    bad_versions = {
        "yaml": (good + "  oops: [unclosed\n", "invalid YAML"),
        "field": (good.replace("path:", "pathh:"), "spec.pathh: unknown field"),
        "dangling": (good + "---\n" + _route_to("nowhere.example.com"),
                     "spec.rules[0].backendRefs[0].providerHost: no LLMProvider serves host 'nowhere.example.com'"),
    }
    for name, (text, message) in bad_versions.items():
        provider.write_text(text)
        wait_until(lambda message=message: message in gw.log(), 10,
                   lambda name=name: f"{name}: error not logged:\n{gw.log()}")
        assert str(provider) in gw.log()
        resp = gw.request(DASHSCOPE, CHAT)
        assert resp.status == 200 and resp.json()["model"] == "qwen1.5-72b-chat", name

    provider.write_text(good.replace("qwen1.5-72b-chat", "qwen-max"))
    wait_until(lambda: gw.request(DASHSCOPE, CHAT).json()["model"] == "qwen-max", 10, lambda: gw.log())

    shutil.rmtree(config)  # a deleted config directory: the last good config keeps serving
    wait_until(lambda: "no such file or directory" in gw.log(), 10, lambda: gw.log())
    assert gw.request(DASHSCOPE, CHAT).json()["model"] == "qwen-max"
    config.mkdir()
    add_seed(config, "01")
    wait_until(lambda: gw.request(DASHSCOPE, CHAT).json()["model"] == "qwen1.5-72b-chat", 10, lambda: gw.log())


def test_api_keys_appear_nowhere_but_on_the_wire_to_the_provider(tmp_path, gateway_factory, keys, fresh_providers):
    """Keys from the environment, in use, with debug logs: then every output is searched for them."""
    gw = gateway_factory(seed_dir(tmp_path, "01", "02", "03", "04", "05", "06"),
                         extra=["--log-level", "debug", "--envoy-log-level", "info"])
    bodies = []
    for host in (DASHSCOPE, MOONSHOT, "demo-llm-server"):
        assert gw.request(host, CHAT).status == 200
        bodies.append(gw.request(host, CHAT, {"x-fake-status": "401"}).body)  # the provider's error passes through
    bodies.append(gw.request(DASHSCOPE, b"not json").body)
    bodies.append(gw.request("nowhere.example", CHAT).body)
    bodies.append(gw.request(DASHSCOPE, {"messages": [{"role": "user", "content": "x" * (9 << 20)}]}).body)  # 413
    config_dump = gw.admin("/config_dump?include_eds")
    clusters = gw.admin("/clusters")
    stats = gw.admin("/stats")
    wait_until(lambda: len(gw.access_entries()) >= 9, 10)
    metrics_text = "\n".join(f"{k} {v}" for k, v in gw.metrics().items())
    bootstrap = __import__("subprocess").run([__import__("sys").executable, "-m", "extproc", "envoy-config"],
                                             capture_output=True, text=True).stdout
    assert gw.stop() == 0  # SIGTERM: a clean exit
    outputs = {"gateway and Envoy logs": gw.log(), "access log": gw.access_log.read_text(), "metrics": metrics_text,
               "config dump": config_dump, "clusters": clusters, "stats": stats, "bootstrap": bootstrap,
               "error bodies": b"".join(bodies).decode(errors="replace")}
    for key in keys.values():
        for where, text in outputs.items():
            assert key not in text, f"an API key leaked into the {where}"
    # the keys were in use all along: the providers got them
    assert fresh_providers[DASHSCOPE].requests[0].headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"


def _route_to(host: str) -> str:
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: dangling
spec:
  host: dangling-route
  rules:
  - backendRefs:
    - providerHost: {host}
"""


def test_envoy_debug_logging_is_refused_because_it_prints_headers(tmp_path):
    import subprocess
    import sys
    result = subprocess.run([sys.executable, "-m", "extproc", "up", "--config", str(seed_dir(tmp_path, "01")),
                             "--envoy-log-level", "debug"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "invalid choice: 'debug'" in result.stderr
