"""The operations endpoint on a loopback port: /metrics, /healthz, /readyz, and nothing else."""

from __future__ import annotations

import asyncio

from extproc.envoy.addresses import HostPort
from extproc.ops.status_http import StatusServer
from extproc.telemetry.metrics import GatewayMetrics, RequestRecord


async def request(port: int, raw: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 5)  # the server closes the connection
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in header_lines)}
    return int(status_line.split()[1]), headers, body


def get(port: int, path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: test\r\n\r\n".encode()


def test_ops_endpoints():
    metrics = GatewayMetrics()
    metrics.observe(RequestRecord(route="llm-route", provider_host="dashscope.aliyuncs.com", outcome="success",
                                  prompt_tokens=12, completion_tokens=3))
    ready = [False]

    async def scenario():
        server = StatusServer(metrics.registry, lambda: ready[0])
        port = await server.start(HostPort("127.0.0.1", 0))
        assert port == server.port and port > 0
        try:
            results = {}
            status, headers, body = await request(port, get(port, "/metrics"))
            results["metrics"] = (status, headers, body)
            results["metrics_query"] = (await request(port, get(port, "/metrics?name[]=x")))[0]
            results["healthz"] = await request(port, get(port, "/healthz"))
            results["readyz_before"] = await request(port, get(port, "/readyz"))
            ready[0] = True
            results["readyz_after"] = await request(port, get(port, "/readyz"))
            results["unknown"] = (await request(port, get(port, "/nope")))[0]
            results["root"] = (await request(port, get(port, "/")))[0]
            results["post"] = await request(port, get(port, "/metrics", "POST"))
            results["head"] = await request(port, get(port, "/healthz", "HEAD"))
            return results
        finally:
            await server.stop()

    results = asyncio.run(scenario())

    status, headers, body = results["metrics"]
    assert status == 200
    assert headers["content-type"].startswith("text/plain")
    assert int(headers["content-length"]) == len(body)
    text = body.decode()
    assert "# TYPE llm_gateway_requests_total counter" in text
    assert 'llm_gateway_requests_total{' in text and 'llm_route="llm-route"' in text
    assert 'gen_ai_token_type="input"' in text
    assert "gen_ai_client_token_usage_sum{" in text
    assert results["metrics_query"] == 200

    status, _, body = results["healthz"]
    assert (status, body) == (200, b"ok\n")
    status, _, _ = results["readyz_before"]
    assert status == 503
    status, _, body = results["readyz_after"]
    assert (status, body) == (200, b"ready\n")
    assert results["unknown"] == 404
    assert results["root"] == 404
    assert results["post"][0] == 405
    status, headers, body = results["head"]
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "3"


def test_ready_is_asked_on_every_probe():
    calls = []

    def ready() -> bool:
        calls.append(1)
        return len(calls) > 2

    async def scenario():
        server = StatusServer(GatewayMetrics().registry, ready)
        port = await server.start(HostPort("127.0.0.1", 0))
        try:
            return [(await request(port, get(port, "/readyz")))[0] for _ in range(4)]
        finally:
            await server.stop()

    assert asyncio.run(scenario()) == [503, 503, 200, 200]


def test_garbage_and_silence_do_not_stop_the_server():
    async def scenario():
        server = StatusServer(GatewayMetrics().registry, lambda: True)
        port = await server.start(HostPort("127.0.0.1", 0))
        try:
            garbage = (await request(port, b"BOGUS\r\n\r\n"))[0]
            # a client that connects and leaves without a word
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            await writer.wait_closed()
            after = (await request(port, get(port, "/healthz")))[0]
            return garbage, after
        finally:
            await server.stop()

    garbage, after = asyncio.run(scenario())
    assert garbage == 405  # no method and path: not a GET
    assert after == 200
