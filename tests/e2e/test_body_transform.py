"""The headers-only path's Envoy pieces (`extproc.envoy.body_transform`, issue 32) against the real
Envoy: what docs/decisions/0008-headers-only-path.md relies on. The ext_proc's decision is stood in
for by Envoy's set_metadata filter (its `request_model` and `stream_options` entries), the provider
by a local echo of what it received, so each fact is Envoy's own."""

from __future__ import annotations

import http.client
import http.server
import json
import subprocess
import threading
import time

import pytest

from extproc.envoy.body_transform import (
    BODY_MODEL_HEADER,
    BODY_READ_HEADER,
    BODY_STREAM_HEADER,
    STREAM_OPTIONS_KEY,
    headers_only_filters,
)
from extproc.ops.up import envoy_binary
from extproc.protocol import METADATA_NAMESPACE
from extproc.testing.ports import free_port

CONFIG_MODEL = "config-model"


class _Echo(http.server.BaseHTTPRequestHandler):
    """Answers with the headers and body it received, as JSON."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # noqa: N802  (http.server's name)
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        out = json.dumps({"headers": {k.lower(): v for k, v in self.headers.items()},
                          "body": body.decode("utf-8")}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: object) -> None:
        pass


def _decision(stream_options: bool) -> dict:
    """The ext_proc's place in the chain: its decision's metadata, set by Envoy itself."""
    value: dict = {"request_model": CONFIG_MODEL}
    if stream_options:
        value[STREAM_OPTIONS_KEY] = {"include_usage": True}
    return {"name": "envoy.filters.http.ext_proc", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.set_metadata.v3.Config",
        "metadata": [{"metadata_namespace": METADATA_NAMESPACE, "value": value}]}}


def _bootstrap(listen: int, admin: int, upstream: int, stream_options: bool) -> dict:
    # headers_only_filters wraps the filter named as the ext_proc; its processing mode is for the
    # ext_proc only, so the stand-in is put back in its place afterwards. The buffer filter, as in
    # the gateway's chain, gives the rewritten body its length again.
    buffer = {"name": "envoy.filters.http.buffer", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer", "max_request_bytes": 1 << 20}}
    filters = headers_only_filters([_decision(stream_options), buffer, {
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}])
    filters = [_decision(stream_options) if f["name"] == "envoy.filters.http.ext_proc" else f for f in filters]
    hcm = {"@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3."
                    "HttpConnectionManager",
           "stat_prefix": "t", "http_filters": filters,
           "route_config": {"virtual_hosts": [{"name": "a", "domains": ["*"], "routes": [
               {"match": {"prefix": "/"}, "route": {"cluster": "echo"}}]}]}}
    address = {"socket_address": {"address": "127.0.0.1", "port_value": upstream}}
    return {"admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
            "static_resources": {
                "listeners": [{"name": "l", "address": {"socket_address": {"address": "127.0.0.1",
                                                                           "port_value": listen}},
                               "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                                               "typed_config": hcm}]}]}],
                "clusters": [{"name": "echo", "type": "STATIC", "connect_timeout": "1s",
                              "load_assignment": {"cluster_name": "echo", "endpoints": [
                                  {"lb_endpoints": [{"endpoint": {"address": address}}]}]}}]}}


@pytest.fixture(scope="module")
def envoys(tmp_path_factory):
    """Two Envoys before one echo: the decision without and with `stream_options`."""
    tmp = tmp_path_factory.mktemp("transform")
    echo = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    threading.Thread(target=echo.serve_forever, daemon=True).start()
    ports, procs = {}, []
    try:
        for stream_options in (False, True):
            listen = free_port()
            path = tmp / f"envoy-{stream_options}.json"
            path.write_text(json.dumps(_bootstrap(listen, free_port(), echo.server_address[1], stream_options)))
            procs.append(subprocess.Popen([envoy_binary(), "-c", str(path), "--disable-hot-restart", "--concurrency",
                                           "1", "--log-level", "error"], stdout=subprocess.DEVNULL,
                                          stderr=(tmp / f"envoy-{stream_options}.log").open("wb")))
            ports[stream_options] = listen
        for listen in ports.values():
            _wait_serving(listen)
        yield ports
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        echo.shutdown()
        echo.server_close()


def _wait_serving(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            _send(port, b"{}")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _send(port: int, body: bytes, content_type: str = "application/json",
          headers: dict[str, str] | None = None) -> tuple[dict[str, str], str]:
    """What the provider received: its headers and body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("POST", "/v1/chat/completions", body=body,
                     headers={"content-type": content_type, **(headers or {})})
        answer = json.loads(conn.getresponse().read())
        return answer["headers"], answer["body"]
    finally:
        conn.close()


SPOOFED = {BODY_STREAM_HEADER: "true", BODY_MODEL_HEADER: "spoofed", BODY_READ_HEADER: "1"}


def test_model_written_and_what_the_decision_needs_read(envoys):
    """The decision's model replaces the client's; the body's `stream` and `model` reach the
    ext_proc's place as headers, with the marker that Envoy parsed the body; every other field is
    kept, though re-serialised (names sorted)."""
    headers, body = _send(envoys[False], json.dumps({"model": "client", "stream": False, "temperature": 0.5,
                                                     "messages": [{"role": "user", "content": "hi"}]}).encode())
    assert json.loads(body) == {"model": CONFIG_MODEL, "stream": False, "temperature": 0.5,
                                "messages": [{"role": "user", "content": "hi"}]}
    assert list(json.loads(body)) == sorted(json.loads(body))
    assert (headers[BODY_STREAM_HEADER], headers[BODY_MODEL_HEADER], headers[BODY_READ_HEADER]) == \
        ("false", "client", "1")
    assert int(headers["content-length"]) == len(body.encode())


def test_stream_options_merged_where_the_decision_sets_them(envoys):
    _, body = _send(envoys[True], b'{"stream":true,"stream_options":{"include_usage":false},"messages":[]}')
    assert json.loads(body) == {"model": CONFIG_MODEL, "stream": True, "stream_options": {"include_usage": True},
                                "messages": []}
    _, body = _send(envoys[False], b'{"stream":false,"messages":[]}')
    assert STREAM_OPTIONS_KEY not in json.loads(body)  # omitted where the decision has none


def test_client_values_of_the_internal_headers_never_pass(envoys):
    """Stripped before the body is read; where the body has no `stream` or `model`, none at all."""
    headers, _ = _send(envoys[False], b'{"messages":[]}', headers=SPOOFED)
    assert BODY_STREAM_HEADER not in headers and BODY_MODEL_HEADER not in headers
    assert headers[BODY_READ_HEADER] == "1"


@pytest.mark.parametrize("body, content_type", [
    pytest.param(b"not json", "application/json", id="not-json"),
    pytest.param(b'{"model":"a","model":"b","messages":[]}', "application/json", id="a-name-given-twice"),
    pytest.param(b'{"model":"client","messages":[]}', "text/plain", id="not-a-json-content-type"),
])
def test_a_body_envoy_cannot_parse_passes_unchanged_without_the_marker(envoys, body, content_type):
    """The transform filter fails open: the body goes on as the client sent it (its model
    included), with none of the internal headers; the ext_proc must refuse a request without
    the marker, or a client could choose its model (a name given twice: most parsers take the last)."""
    headers, received = _send(envoys[False], body, content_type, SPOOFED)
    assert received.encode() == body
    assert not {BODY_STREAM_HEADER, BODY_MODEL_HEADER, BODY_READ_HEADER} & set(headers)


def test_an_integer_past_double_precision_loses_digits(envoys):
    """Numbers go through a protobuf Struct (doubles): the body path keeps them exactly."""
    _, body = _send(envoys[False], b'{"seed":18446744073709551617,"messages":[]}')
    assert json.loads(body)["seed"] != 18446744073709551617
