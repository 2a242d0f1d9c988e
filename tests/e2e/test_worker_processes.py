"""`serve --workers 2` behind a real Envoy: ext_proc streams spread over both processes, and the one
`/metrics` adds them up exactly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.request

from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.ops.up import envoy_binary
from extproc.protocol import EXT_PROC_CLUSTER
from extproc.testing.envoy_fake import start_envoy_fake
from support.auth_helpers import token_files
from support.helpers import CHAT, Gateway, free_port, seed_dir, wait_until

DASHSCOPE = "dashscope.aliyuncs.com"
THREADS, PER_THREAD = 4, 100


def _metrics(port: int) -> dict[tuple[str, frozenset], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def _by_worker(m: dict) -> dict[str, float]:
    return {dict(labels)["worker"]: v for (name, labels), v in m.items()
            if name == "llm_gateway_ext_proc_streams_opened_total"}


def _requests(m: dict) -> float:
    return sum(v for (name, _), v in m.items() if name == "llm_gateway_requests_total")


def test_two_workers_share_the_streams_and_metrics_add_up(tmp_path, ca, keys):
    fake = start_envoy_fake(envoy_binary(), ca, [DASHSCOPE], free_port(), free_port(), tmp_path)
    control, ext_proc, metrics, listen, admin = (free_port() for _ in range(5))
    log_file = tmp_path / "serve.log"
    tokens = token_files(tmp_path)  # every worker checks Envoy's token
    serve = subprocess.Popen(
        [sys.executable, "-m", "extproc", "serve", "--config", str(seed_dir(tmp_path, "01")), "--workers", "2",
         "--auth-token-file", str(tokens.token_file),
         "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
         "--metrics", f"127.0.0.1:{metrics}", "--upstream-ca", str(ca.cert_file),
         "--resolve", f"{DASHSCOPE}=127.0.0.1:{fake.port}"],
        stdout=log_file.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **keys})
    boot = bootstrap(BootstrapOptions(listen=HostPort("127.0.0.1", listen), admin=HostPort("127.0.0.1", admin),
                                      control=HostPort("127.0.0.1", control), ext_proc=HostPort("127.0.0.1", ext_proc),
                                      access_log=None, token_sds=str(tokens.sds_file)))
    # new connections (each placed on a worker by the kernel) every 20 streams rather than every
    # 1000, so that a few hundred requests spread for certain
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == EXT_PROC_CLUSTER]
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    options["common_http_protocol_options"]["max_requests_per_connection"] = 20
    (tmp_path / "envoy.json").write_text(json.dumps(boot))
    envoy = None
    try:
        wait_until(lambda: "worker processes, SO_REUSEPORT" in log_file.read_text() or serve.poll() is not None, 60,
                   log_file.read_text)
        assert serve.poll() is None, log_file.read_text()
        envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "envoy.json"), "--disable-hot-restart",
                                  "--concurrency", "2", "--log-level", "error"], stdout=subprocess.DEVNULL,
                                 stderr=(tmp_path / "envoy.log").open("wb"))
        gw = Gateway(envoy, listen, admin, tmp_path / "envoy.log")

        def ok() -> bool:
            try:
                return Gateway(envoy, listen, admin, gw.log_file).request(DASHSCOPE, CHAT).status == 200
            except OSError:
                return False

        wait_until(ok, 30, log_file.read_text)
        before = _metrics(metrics)
        wait_until(lambda: _requests(_metrics(metrics)) == sum(_by_worker(_metrics(metrics)).values()), 20)
        before = _metrics(metrics)

        statuses: list[int] = []
        lock = threading.Lock()

        def client() -> None:
            mine = Gateway(envoy, listen, admin, gw.log_file)
            for _ in range(PER_THREAD):
                status = mine.request(DASHSCOPE, CHAT).status
                with lock:
                    statuses.append(status)

        threads = [threading.Thread(target=client) for _ in range(THREADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        sent = THREADS * PER_THREAD
        assert statuses == [200] * sent

        after = _metrics(metrics)
        opened = {w: after_n - _by_worker(before).get(w, 0) for w, after_n in _by_worker(after).items()}
        print(f"\next_proc streams per process for {sent} requests: {opened}")
        assert set(opened) == {"0", "1"}
        assert all(n > 0 for n in opened.values()), opened
        assert sum(opened.values()) == sent
        # the access log (one stream, on whichever process) counts each request once, in the sum
        wait_until(lambda: _requests(_metrics(metrics)) - _requests(before) >= sent, 20)
        assert _requests(_metrics(metrics)) - _requests(before) == sent

        serve.send_signal(signal.SIGTERM)
        assert serve.wait(60) == 0, log_file.read_text()
        assert "Traceback" not in log_file.read_text()
    finally:
        if envoy is not None:
            envoy.terminate()
            envoy.wait(10)
        if serve.poll() is None:
            serve.kill()
            serve.wait()
        fake.stop()
