from __future__ import annotations

import secrets

import pytest

pytest.register_assert_rewrite("support")  # the shared helpers' asserts explain themselves, as the tests' do

from extproc.demo.ca import ThrowawayCA  # noqa: E402
from extproc.demo.fake_provider import FakeProvider  # noqa: E402
from support.helpers import Gateway, start_gateway, upstream_args  # noqa: E402
from support.redis_server import RedisServer  # noqa: E402


@pytest.fixture(scope="session")
def ca(tmp_path_factory) -> ThrowawayCA:
    return ThrowawayCA(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def keys() -> dict[str, str]:
    """API keys made at run time, in the variables the seed manifests name."""
    return {
        "YOUR_DASHSCOPE_API_KEY": "sk-test-dashscope-" + secrets.token_hex(8),
        "YOUR_MOONSHOT_API_KEY": "sk-test-moonshot-" + secrets.token_hex(8),
    }


@pytest.fixture(scope="session")
def providers(ca, keys):
    """Local HTTPS fakes for the seed's two providers, each checking its own key."""
    fakes = {}
    for host, name, var in (("dashscope.aliyuncs.com", "dashscope", "YOUR_DASHSCOPE_API_KEY"),
                            ("api.moonshot.cn", "moonshot", "YOUR_MOONSHOT_API_KEY")):
        cert = ca.issue([host])
        fakes[host] = FakeProvider(name, cert.cert_file, cert.key_file, api_key=keys[var]).start()
    yield fakes
    for fake in fakes.values():
        fake.stop()


@pytest.fixture
def fresh_providers(providers):
    for fake in providers.values():
        fake.clear()
    return providers


@pytest.fixture
def gateway_factory(tmp_path, ca, fresh_providers, keys):
    """Start `extproc up` on a config; stopped (and checked for a clean exit) after the test."""
    started: list[Gateway] = []

    def start(config, extra: list[str] = (), env: dict[str, str] | None = None, wait: bool = True) -> Gateway:
        gw = start_gateway(config, tmp_path, {**keys, **(env or {})},
                           [*upstream_args(ca, fresh_providers), *extra], wait=wait)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


@pytest.fixture
def redis_server(tmp_path):
    """A throwaway redis-server (see support/redis_server.py), stopped after the test."""
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.kill()
