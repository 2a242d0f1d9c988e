"""Two `extproc serve` replicas behind one Envoy, under wrk load: one drained with SIGTERM fails
no request; one killed with SIGKILL fails only what was in flight on it, and service goes on."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.ops.up import envoy_binary
from extproc.testing.envoy_fake import start_envoy_fake
from extproc.testing.load import run_wrk
from support.auth_helpers import token_files
from support.helpers import CHAT, Gateway, free_port, seed_dir, wait_until

DASHSCOPE = "dashscope.aliyuncs.com"
CONNECTIONS = 8
LOAD_LUA = """
local body = '{"messages": [{"role": "user", "content": "Please introduce yourself."}]}'
request = function()
  return wrk.format("POST", "/", {["Host"] = "dashscope.aliyuncs.com", ["Content-Type"] = "application/json"}, body)
end
"""


class Replica:
    def __init__(self, name: str, config: Path, tmp: Path, env: dict, extra: list[str]):
        self.control, self.ext_proc, self.metrics = free_port(), free_port(), free_port()
        self.log_file = tmp / f"serve-{name}.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--listen", f"127.0.0.1:{self.control}",
             "--ext-proc-listen", f"127.0.0.1:{self.ext_proc}", "--metrics", f"127.0.0.1:{self.metrics}",
             "--drain-grace", "10", *extra],
            stdout=self.log_file.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **env})

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def streams_served(self) -> float:
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            text = r.read().decode()
        return sum(s.value for f in text_string_to_metric_families(text) for s in f.samples
                   if s.name == "llm_gateway_ext_proc_streams_opened_total")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _endpoint(port: int) -> dict:
    return {"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": port}}}}


@pytest.fixture
def two_replicas(tmp_path, ca, keys):
    """Two replicas on the same config, one Envoy whose ext_proc and xDS clusters list both (as
    a headless Service's DNS name would), and a fast fake provider (Envoy answering itself)."""
    assert shutil.which("wrk"), "wrk is missing: apt-get install wrk (scripts/test does)"
    fake = start_envoy_fake(envoy_binary(), ca, [DASHSCOPE], free_port(), free_port(), tmp_path)
    config = seed_dir(tmp_path, "01")
    tokens = token_files(tmp_path)  # replicas listen on TCP: Envoy presents its token
    extra = ["--upstream-ca", str(ca.cert_file), "--resolve", f"{DASHSCOPE}=127.0.0.1:{fake.port}",
             "--auth-token-file", str(tokens.token_file)]
    replicas: list[Replica] = []
    envoy = None
    try:
        replicas += [Replica(n, config, tmp_path, keys, extra) for n in ("a", "b")]
        listen, admin = free_port(), free_port()
        boot = bootstrap(BootstrapOptions(listen=HostPort("127.0.0.1", listen), admin=HostPort("127.0.0.1", admin),
                                          control=HostPort("127.0.0.1", replicas[0].control),
                                          ext_proc=HostPort("127.0.0.1", replicas[0].ext_proc), access_log=None,
                                          token_sds=str(tokens.sds_file)))
        kinds = {replicas[0].control: "control", replicas[0].ext_proc: "ext_proc"}
        for cluster in boot["static_resources"]["clusters"]:
            endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            kind = kinds[endpoints[0]["endpoint"]["address"]["socket_address"]["port_value"]]
            endpoints[:] = [_endpoint(getattr(r, kind)) for r in replicas]
        (tmp_path / "envoy.json").write_text(json.dumps(boot))
        envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "envoy.json"), "--disable-hot-restart",
                                  "--concurrency", "1", "--log-level", "error"], stdout=subprocess.DEVNULL,
                                 stderr=(tmp_path / "envoy.log").open("wb"))
        gw = Gateway(envoy, listen, admin, tmp_path / "envoy.log")
        for r in replicas:
            wait_until(lambda r=r: ("ext_proc and access log service listening" in r.log()
                                    or r.process.poll() is not None), 30, r.log)
            assert r.process.poll() is None, r.log()
        wait_until(lambda: _ok(gw), 30, lambda: "\n".join(r.log() for r in replicas))
        # both replicas healthy in Envoy's eyes before the load starts
        wait_until(lambda: gw.admin("/clusters").count("::health_flags::healthy") >= 4, 30,
                   lambda: gw.admin("/clusters"))
        yield gw, replicas
    finally:
        if envoy is not None:
            envoy.terminate()
            envoy.wait(10)
        for r in replicas:
            r.stop()
        fake.stop()


def _ok(gw: Gateway) -> bool:
    try:
        return Gateway(gw.process, gw.listen_port, gw.admin_port, gw.log_file).request(DASHSCOPE, CHAT).status == 200
    except OSError:
        return False


def _load(gw: Gateway, tmp: Path, seconds: float) -> tuple[threading.Thread, dict]:
    script = tmp / "load.lua"
    script.write_text(LOAD_LUA)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(run_wrk(gw.listen_port, script, CONNECTIONS, seconds)))
    thread.start()
    return thread, result


def test_a_replica_drained_with_sigterm_fails_no_request(tmp_path, two_replicas):
    gw, (a, b) = two_replicas
    load, result = _load(gw, tmp_path, 12)
    time.sleep(3)
    served_before = a.streams_served(), b.streams_served()
    a.process.send_signal(signal.SIGTERM)
    assert a.process.wait(30) == 0, a.log()
    load.join(90)
    print(f"\nSIGTERM one of two replicas under load: {result}; served before the drain {served_before}")
    assert all(n > 0 for n in served_before), served_before  # both took load before
    assert result["requests"] > 0
    assert result["errors"] == 0, result
    assert "every request in flight finished" in a.log(), a.log()
    assert _ok(gw)


def test_a_replica_killed_fails_only_its_requests_in_flight(tmp_path, two_replicas):
    gw, (a, b) = two_replicas
    load, result = _load(gw, tmp_path, 8)
    time.sleep(3)
    b.process.kill()
    b.process.wait()
    load.join(90)
    print(f"\nSIGKILL one of two replicas under load: {result}")
    assert result["requests"] > 0
    # What was in flight on the killed replica (at most one per client connection), and what its
    # dead address refused before Envoy's workers learnt of the ejection: each worker has its own
    # connection pool and hears of an ejection from the main thread, so a loaded machine (the
    # whole suite at once) sees a few refusals, not one (once: 11 errors with 8 connections).
    # Bounded at one more per client connection; a replica never ejected fails about half of
    # the thousands of requests that follow.
    assert result["errors"] <= 2 * CONNECTIONS, result
    after, after_result = _load(gw, tmp_path, 3)
    after.join(60)
    assert after_result["requests"] > 0
    assert after_result["errors"] == 0, after_result  # the live replica carries everything
