"""Thousands of streams at once through one `extproc up` (issue 31), with a provider that holds
any number of them (`extproc.testing.stream_provider`: asyncio, TLS, HTTP/2 as real providers
offer it) and as many asyncio clients, each reading its whole stream.

The provider holds every stream after its first event until the test releases it, so "all open
at once" is a fact the test looks at, not a matter of timing. While they are held, the provider
has every one of them open, Envoy's provider cluster has every one in flight, and the ext_proc
has none: its stream ended when the request was decided. Past a configured capacity (a provider's
`spec.connectionPool`, the ext_proc's `--max-ext-proc-streams`) the extra requests get a JSON 503
`overloaded` with Retry-After, counted in the metrics, and the requests in flight finish.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys

import pytest

from extproc.ops.descriptors import raise_descriptor_limit
from extproc.testing.ports import free_port
from extproc.testing.stream_clients import CHAT_STREAM, StreamResult, stream_request
from extproc.testing.stream_provider import call
from support.helpers import REPO, wait_until

HOST = "stream.llm.test"
CLUSTER = "llm_provider_stream_llm_test"
KEY_VAR = "STREAM_PROVIDER_KEY"
MANY = 3000  # several thousand on 2 shared cores, in about half a minute
EVENTS = 4


def provider_yaml(capacity: int | None = None) -> str:
    pool = "" if capacity is None else f"  connectionPool:\n    http:\n      http2MaxRequests: {capacity}\n"
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: streams
spec:
  host: {HOST}
{pool}  configs:
    defaultConfig:
      openAIConfig:
        model: stream-model
        apiKey: ${{{KEY_VAR}}}
"""


class Provider:
    def __init__(self, port: int, ca_file: str, key: str):
        self.port, self.ca_file, self.key = port, ca_file, key

    def call(self, path: str, method: str = "POST") -> dict:
        return call(self.port, path, self.ca_file, HOST, method)


@pytest.fixture(scope="module")
def stream_provider(ca):
    key = "sk-stream-" + secrets.token_hex(8)
    cert = ca.issue([HOST], stem="stream-provider")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "extproc.testing.stream_provider", "--cert", str(cert.cert_file),
                                "--key", str(cert.key_file), "--port", str(port), "--api-key-env", KEY_VAR],
                               env={**os.environ, KEY_VAR: key}, cwd=REPO)
    provider = Provider(port, str(ca.cert_file), key)

    def answering() -> bool:
        try:
            provider.call("/stats", "GET")
            return True
        except OSError:
            return process.poll() is not None
    wait_until(answering, 30, lambda: "the stream provider did not start")
    assert process.poll() is None
    yield provider
    process.terminate()
    process.wait(10)


@pytest.fixture
def held(stream_provider):
    """Streams asking for a hold wait after their first event until the test releases them."""
    stream_provider.call("/hold")
    yield stream_provider
    stream_provider.call("/release")  # whatever happened, nothing stays held


def start(gateway_factory, tmp_path, provider: Provider, capacity: int | None = None, extra: list[str] = ()):
    config = tmp_path / "config"
    config.mkdir()
    (config / "streams.yaml").write_text(provider_yaml(capacity))
    return gateway_factory(config, extra=["--resolve", f"{HOST}=127.0.0.1:{provider.port}", "--access-log", "none",
                                          *extra], env={KEY_VAR: provider.key})


def envoy_stat(gw, name: str) -> int:
    for line in gw.admin(f"/stats?filter=^{name}$").splitlines():
        key, _, value = line.partition(": ")
        if key == name:
            return int(value)
    return 0


def provider_stats(gw) -> list[str]:
    """Envoy's counters of the provider's cluster that are not zero (what ended a stream, if one failed)."""
    lines = gw.admin(f"/stats?filter=cluster.{CLUSTER}").splitlines()
    return [line for line in lines if not line.endswith(": 0") and "No recorded values" not in line]


def metric(gw, name: str, **labels: str) -> float:
    """The sum of a metric's samples that carry `labels`."""
    return sum(value for (sample, sample_labels), value in gw.metrics().items()
               if sample == name and set(labels.items()) <= set(sample_labels))


HOLD = [("x-events", str(EVENTS)), ("x-pace-ms", "20"), ("x-hold-after", "1")]


def assert_overloaded(result: StreamResult) -> None:
    """Envoy's refusal at a limit, in the gateway's words: no internal reason, a retry hint."""
    assert result.status == 503, result
    error = result.json()["error"]
    assert (error["code"], error["type"]) == ("overloaded", "server_error")
    assert "overflow" not in error["message"] and "ext_proc" not in error["message"]
    assert result.headers["retry-after"] == "1"


def test_thousands_of_concurrent_streams_all_complete_and_none_holds_an_ext_proc_stream(
        tmp_path, gateway_factory, held):
    raise_descriptor_limit(MANY)  # this process holds a connection per client
    gw = start(gateway_factory, tmp_path, held)
    # a gateway that has answered a request: Envoy opens its access-log stream with the first entry
    assert gw.request(HOST, {"messages": [{"role": "user", "content": "Hi"}]}).status == 200
    wait_until(lambda: metric(gw, "llm_gateway_requests_total") == 1, 15)
    opened_before = metric(gw, "llm_gateway_ext_proc_streams_opened_total")

    async def burst() -> tuple[list[StreamResult], dict | None]:
        firsts = [asyncio.Event() for _ in range(MANY)]
        tasks = [asyncio.ensure_future(stream_request(gw.listen_port, HOST, CHAT_STREAM, HOLD, first_event=f))
                 for f in firsts]
        seen = None
        try:
            async with asyncio.timeout(180):  # every stream open and held, or already over (failed)
                while not all(f.is_set() or t.done() for f, t in zip(firsts, tasks, strict=True)):
                    await asyncio.sleep(0.1)
            if all(f.is_set() and not t.done() for f, t in zip(firsts, tasks, strict=True)):  # who holds what
                seen = {
                    "provider": (await asyncio.to_thread(held.call, "/stats", "GET"))["open"],
                    "envoy_provider": await asyncio.to_thread(envoy_stat, gw, f"cluster.{CLUSTER}.upstream_rq_active"),
                    "envoy_ext_proc": await asyncio.to_thread(
                        envoy_stat, gw, "cluster.llm_gateway_ext_proc.upstream_rq_active"),
                    "ext_proc": await asyncio.to_thread(metric, gw, "llm_gateway_ext_proc_streams"),
                }
        finally:
            await asyncio.to_thread(held.call, "/release")
        return list(await asyncio.gather(*tasks)), seen

    results, seen = asyncio.run(burst())

    failed = [r for r in results if not (r.complete and r.events == EVENTS)]
    assert not failed, f"{len(failed)} of {MANY} streams failed, e.g. {failed[:3]}; Envoy: {provider_stats(gw)}"
    assert seen == {"provider": MANY, "envoy_provider": MANY, "envoy_ext_proc": 0, "ext_proc": 0}
    assert metric(gw, "llm_gateway_ext_proc_streams") == 0
    assert metric(gw, "llm_gateway_ext_proc_streams_opened_total") - opened_before == MANY
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="success") == MANY + 1, 30,
               lambda: f"{metric(gw, 'llm_gateway_requests_total')} {gw.admin('/stats?filter=access_log')}")
    prefix = "http.llm_gateway.ext_proc.request."
    assert envoy_stat(gw, prefix + "streams_started") == envoy_stat(gw, prefix + "streams_closed") >= MANY
    assert envoy_stat(gw, prefix + "streams_failed") == 0


def test_past_a_providers_capacity_the_extra_requests_get_503_overloaded_and_the_others_finish(
        tmp_path, gateway_factory, held):
    capacity, extra = 20, 10
    gw = start(gateway_factory, tmp_path, held, capacity=capacity)

    async def burst() -> tuple[list[StreamResult], StreamResult]:
        firsts = [asyncio.Event() for _ in range(capacity + extra)]
        tasks = [asyncio.ensure_future(stream_request(gw.listen_port, HOST, CHAT_STREAM, HOLD, first_event=f))
                 for f in firsts]
        try:
            async with asyncio.timeout(60):  # the capacity in flight and held, the rest answered
                while sum(f.is_set() for f in firsts) < capacity or sum(t.done() for t in tasks) < extra:
                    await asyncio.sleep(0.05)
            late = await stream_request(gw.listen_port, HOST, CHAT_STREAM, HOLD)  # while the provider is full
        finally:
            await asyncio.to_thread(held.call, "/release")
        return list(await asyncio.gather(*tasks)), late

    results, late = asyncio.run(burst())

    admitted = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    assert (len(admitted), len(refused)) == (capacity, extra)
    assert all(r.complete and r.events == EVENTS for r in admitted)  # the requests in flight were untouched
    for result in [*refused, late]:
        assert_overloaded(result)
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="gateway_error",
                              error_type="overloaded") == extra + 1, 30, lambda: f"{gw.metrics()}")
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="success") == capacity, 30,
               lambda: f"{gw.metrics()}")
    assert gw.request(HOST, {"messages": [{"role": "user", "content": "Hi"}]}).status == 200  # room again


def test_past_the_ext_proc_capacity_the_extra_requests_get_503_overloaded_and_the_others_finish(
        tmp_path, gateway_factory, stream_provider):
    capacity, extra = 10, 5
    gw = start(gateway_factory, tmp_path, stream_provider, extra=["--max-ext-proc-streams", str(capacity)])

    async def burst() -> list[StreamResult]:
        body_held = asyncio.Event()  # the ext_proc is deciding every request until its body is whole
        tasks = [asyncio.ensure_future(stream_request(gw.listen_port, HOST, CHAT_STREAM, [("x-events", "2")],
                                                      body_held=body_held)) for _ in range(capacity + extra)]
        try:
            async with asyncio.timeout(60):
                while (sum(t.done() for t in tasks) < extra
                       or await asyncio.to_thread(metric, gw, "llm_gateway_ext_proc_streams") < capacity):
                    await asyncio.sleep(0.05)
        finally:
            body_held.set()
        return list(await asyncio.gather(*tasks))

    results = asyncio.run(burst())

    admitted = [r for r in results if r.status == 200]
    refused = [r for r in results if r.status != 200]
    assert (len(admitted), len(refused)) == (capacity, extra)
    assert all(r.complete and r.events == 2 for r in admitted)
    for result in refused:
        assert_overloaded(result)
    assert metric(gw, "llm_gateway_ext_proc_streams") == 0
    wait_until(lambda: metric(gw, "llm_gateway_requests_total", outcome="gateway_error",
                              error_type="overloaded") == extra, 30, lambda: f"{gw.metrics()}")
