"""A fast fake provider for load tests and the benchmark: an Envoy answering every request with a
fixed chat completion over TLS (`direct_response`), so the provider side costs little and the
numbers measure the gateway, not a Python test server."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ..demo.ca import ThrowawayCA
from ..envoy.bootstrap import HCM_NAME, HCM_TYPE

ANSWER = {
    "id": "chatcmpl-fast", "object": "chat.completion", "created": 1720680044, "model": "fast-fake-model",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!"}, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7},
}


EVENTS = "".join(
    f"data: {json.dumps(e)}\n\n" for e in (
        {"id": "chatcmpl-fast", "object": "chat.completion.chunk", "model": "fast-fake-model",
         "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hello!"}, "finish_reason": None}]},
        {"id": "chatcmpl-fast", "object": "chat.completion.chunk", "model": "fast-fake-model",
         "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"id": "chatcmpl-fast", "object": "chat.completion.chunk", "model": "fast-fake-model", "choices": [],
         "usage": {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}},
    )) + "data: [DONE]\n\n"
STREAM_HEADER = "x-fake-stream"  # a request with this header gets the answer as server-sent events


def fake_bootstrap(cert_file: Path, key_file: Path, port: int, admin_port: int, answer: dict = ANSWER,
                   plain_port: int | None = None) -> dict:
    tls = {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
           "common_tls_context": {"alpn_protocols": ["h2", "http/1.1"], "tls_certificates": [{
               "certificate_chain": {"filename": str(cert_file)}, "private_key": {"filename": str(key_file)}}]}}
    hcm = {"@type": HCM_TYPE,
           "stat_prefix": "fake", "codec_type": "AUTO",
           "route_config": {"virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
               "match": {"prefix": "/", "headers": [{"name": STREAM_HEADER, "present_match": True}]},
               "direct_response": {"status": 200, "body": {"inline_string": EVENTS}},
               "response_headers_to_add": [{"header": {"key": "content-type", "value": "text/event-stream"}}]}, {
               "match": {"prefix": "/"},
               "direct_response": {"status": 200, "body": {"inline_string": json.dumps(answer)}},
               "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}]}]}]},
           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
               "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}
    listeners = [{
        "name": "fake", "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [{"transport_socket": {"name": "envoy.transport_sockets.tls", "typed_config": tls},
                           "filters": [{"name": HCM_NAME, "typed_config": hcm}]}],
    }]
    if plain_port is not None:  # the same answers over plain HTTP, for clients whose TLS trust is awkward
        listeners.append({
            "name": "fake_plain", "address": {"socket_address": {"address": "127.0.0.1", "port_value": plain_port}},
            "filter_chains": [{"filters": [{"name": HCM_NAME, "typed_config": hcm}]}],
        })
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": listeners},
    }


@dataclass
class EnvoyFake:
    process: subprocess.Popen
    port: int

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def start_envoy_fake(envoy: str, ca: ThrowawayCA, hosts: list[str], port: int, admin_port: int, workdir: Path,
                     concurrency: int = 1, plain_port: int | None = None) -> EnvoyFake:
    cert = ca.issue(hosts, stem="envoy-fake")
    config = workdir / "envoy-fake.json"
    boot = fake_bootstrap(cert.cert_file, cert.key_file, port, admin_port, plain_port=plain_port)
    config.write_text(json.dumps(boot))
    process = subprocess.Popen([envoy, "-c", str(config), "--disable-hot-restart", "--concurrency", str(concurrency),
                                "--log-level", "error"],
                               stdout=subprocess.DEVNULL, stderr=(workdir / "envoy-fake.log").open("wb"))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/ready", timeout=1) as r:
                if r.status == 200:
                    return EnvoyFake(process, port)
        except OSError:
            if process.poll() is not None:
                break
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the fake provider Envoy did not start: {(workdir / 'envoy-fake.log').read_text()}")
