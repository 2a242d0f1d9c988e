"""`up` waiting for its Envoy: what it says while waiting and when it gives up, read from an
admin interface that answers as a starting Envoy's does (a local HTTP server)."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from extproc.envoy.addresses import HostPort
from extproc.ops import up
from extproc.ops.startup import StartupError

WARMING = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster",
                        "cluster": {"name": f"llm_provider_p{i}_bad_test", "load_assignment": {"endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {
                                "address": f"p{i}.bad.test", "port_value": 443}}}}]}]}}} for i in range(7)]}


class StartingEnvoy(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/ready":
            self._send(503, "PRE_INITIALIZING\n")
        elif self.path.startswith("/stats"):
            self._send(200, "cluster_manager.cds.update_success: 1\n"
                            "cluster_manager.cds.control_plane.connected_state: 1\n"
                            "cluster_manager.warming_clusters: 7\nserver.state: 2\n")
        elif self.path.startswith("/config_dump"):
            self._send(200, json.dumps(WARMING))
        elif self.path == "/init_dump":
            self._send(200, json.dumps({"unready_targets_dumps": []}))
        else:
            self._send(404, "")

    def _send(self, status: int, body: str) -> None:
        data = body.encode()
        self.send_response(status)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Running:
    returncode = None


@pytest.fixture
def admin():
    server = ThreadingHTTPServer(("127.0.0.1", 0), StartingEnvoy)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield HostPort("127.0.0.1", server.server_address[1])
    server.shutdown()


def test_up_says_what_envoy_waits_for_and_names_it_when_it_gives_up(admin, monkeypatch, caplog):
    monkeypatch.setattr(up, "REPORT_EVERY_S", 0.3)
    caplog.set_level(logging.INFO, logger="extproc.ops.up")
    with pytest.raises(StartupError) as failure:
        asyncio.run(up.wait_ready(admin, Running(), timeout=1.0))
    message = str(failure.value)
    assert message.startswith("envoy was not ready within 1s: it was still waiting for 7 cluster(s) warming, "
                              "each waiting for its first DNS answer: llm_provider_p0_bad_test (p0.bad.test)")
    assert "and 2 more" in message
    said = [r.getMessage() for r in caplog.records if "Envoy not ready after" in r.getMessage()]
    assert said and "7 cluster(s) warming" in said[0]


def test_an_admin_that_does_not_answer_is_named(monkeypatch):
    from extproc.testing.ports import free_port

    with pytest.raises(StartupError, match="Envoy's admin interface to answer"):
        asyncio.run(up.wait_ready(HostPort("127.0.0.1", free_port()), Running(), timeout=0.3))
