"""The seed's scenarios through a real Envoy, the real ext_proc and local HTTPS providers."""

from __future__ import annotations

import collections

import pytest

from support.helpers import CHAT, add_seed, seed_dir, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"


@pytest.mark.parametrize("proxy_form", [True, False], ids=["proxy-form", "host-header"])
def test_scenario0_one_provider(tmp_path, gateway_factory, fresh_providers, keys, proxy_form):
    gw = gateway_factory(seed_dir(tmp_path, "01"))
    resp = gw.request(DASHSCOPE, {**CHAT, "model": "client-choice", "temperature": 0.2}, proxy_form=proxy_form)
    assert resp.status == 200, resp.body
    assert resp.json()["model"] == "qwen1.5-72b-chat"

    (seen,) = fresh_providers[DASHSCOPE].requests
    assert seen.path == "/compatible-mode/v1/chat/completions"
    assert seen.sni == DASHSCOPE
    assert seen.headers["host"] == DASHSCOPE
    assert seen.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
    assert seen.headers["content-type"] == "application/json"
    # model replaced, every other field kept, no stream added where the config sets none
    assert seen.body == {**CHAT, "model": "qwen1.5-72b-chat", "temperature": 0.2}
    assert not any(name.startswith("x-llm-gateway-") for name in seen.headers)
    assert fresh_providers[MOONSHOT].requests == []


def test_scenario1_route_by_header_applied_while_running(tmp_path, gateway_factory, fresh_providers):
    config = seed_dir(tmp_path, "01")
    gw = gateway_factory(config)
    assert gw.request(DASHSCOPE, CHAT, {"user-type": "subscriber"}).json()["model"] == "qwen1.5-72b-chat"

    # `kubectl apply` of the route, then of the updated provider: the files change under a running gateway
    add_seed(config, "02")
    add_seed(config, "03")
    wait_until(lambda: gw.request(DASHSCOPE, CHAT, {"user-type": "subscriber"}).json()["model"] == "qwen-turbo", 10,
               lambda: f"vip-route never took effect:\n{gw.log()}")
    assert gw.request(DASHSCOPE, CHAT).json()["model"] == "qwen1.5-72b-chat"
    assert gw.request(DASHSCOPE, CHAT, {"user-type": "visitor"}).json()["model"] == "qwen1.5-72b-chat"
    assert gw.request(DASHSCOPE, CHAT, {"user-type": "subscriber"}, proxy_form=False).json()["model"] == "qwen-turbo"


def test_scenario2_provider_added_while_running_and_weighted_split(tmp_path, gateway_factory, fresh_providers, keys):
    config = seed_dir(tmp_path, "01", "02", "03")
    gw = gateway_factory(config)
    assert gw.request("demo-llm-server", CHAT).status == 404

    for prefix in ("04", "05", "06"):
        add_seed(config, prefix)
    wait_until(lambda: gw.request("demo-llm-server", CHAT).status == 200, 10,
               lambda: f"demo-llm-server never served:\n{gw.log()}")

    models = collections.Counter()
    for i in range(400):
        resp = gw.request("demo-llm-server", CHAT, proxy_form=bool(i % 2))
        assert resp.status == 200, resp.body
        models[resp.json()["model"]] += 1
    assert set(models) == {"qwen1.5-72b-chat", "moonshot-v1-8k"}
    assert 0.40 <= models["moonshot-v1-8k"] / 400 <= 0.60, models

    moonshot = fresh_providers[MOONSHOT].requests[-1]
    assert moonshot.path == "/v1/chat/completions"
    assert moonshot.sni == MOONSHOT
    assert moonshot.headers["authorization"] == f"Bearer {keys['YOUR_MOONSHOT_API_KEY']}"
    assert moonshot.body["stream"] is False  # the provider config sets stream: false
    # Kubernetes names of the route's Service answer too
    for name in ("demo-llm-server.default", "demo-llm-server.default.svc.cluster.local:80", "DEMO-LLM-SERVER"):
        assert gw.request(name, CHAT).status == 200, name


def test_client_cannot_choose_cluster_or_key(tmp_path, gateway_factory, fresh_providers, keys):
    gw = gateway_factory(seed_dir(tmp_path, "01", "04"))
    resp = gw.request(DASHSCOPE, CHAT, {
        "x-llm-gateway-cluster": "llm_provider_api_moonshot_cn",
        "authorization": "Bearer client-supplied",
    })
    assert resp.status == 200, resp.body
    assert resp.json()["model"] == "qwen1.5-72b-chat"
    assert fresh_providers[MOONSHOT].requests == []
    (seen,) = fresh_providers[DASHSCOPE].requests
    assert seen.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
    assert "x-llm-gateway-cluster" not in seen.headers
    # naming the control plane's own cluster does not reach it either
    resp = gw.request(DASHSCOPE, CHAT, {"x-llm-gateway-cluster": "llm_gateway_control"})
    assert resp.json()["model"] == "qwen1.5-72b-chat"
