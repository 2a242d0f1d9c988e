"""Test helpers: a real gateway (`python -m extproc up`) as a subprocess, and an HTTP client."""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from extproc.testing.ports import free_port

if TYPE_CHECKING:
    from extproc.demo.ca import ThrowawayCA
    from extproc.demo.fake_provider import FakeProvider

REPO = Path(__file__).resolve().parents[2]
SEED_MANIFESTS = REPO / "extproc" / "demo" / "manifests"
CHAT = {"messages": [{"role": "user", "content": "Please introduce yourself."}]}


def upstream_args(ca: ThrowawayCA, providers: dict[str, FakeProvider]) -> list[str]:
    """`extproc up`'s flags that make it trust the test CA and dial the local fake providers."""
    args = ["--upstream-ca", str(ca.cert_file)]
    for host, fake in providers.items():
        args += ["--resolve", f"{host}=127.0.0.1:{fake.port}"]
    return args


def seed_dir(tmp: Path, *names: str) -> Path:
    """A config directory holding the named seed manifests (by file-name prefix, e.g. "01")."""
    config = tmp / "config"
    config.mkdir(exist_ok=True)
    for prefix in names:
        add_seed(config, prefix)
    return config


def add_seed(config: Path, prefix: str) -> None:
    (src,) = [p for p in SEED_MANIFESTS.iterdir() if p.name.startswith(prefix)]
    shutil.copy(src, config / src.name)


def provider_yaml(name: str, host: str, model: str = "m-1", key: str = "sk-test-inline") -> str:
    return f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: {name}
spec:
  host: {host}
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig:
        model: {model}
        apiKey: {key}
"""


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self):
        return json.loads(self.body)


@dataclass
class Gateway:
    process: subprocess.Popen
    listen_port: int
    admin_port: int
    log_file: Path
    metrics_port: int = 0
    access_log: Path | None = None
    _conn: http.client.HTTPConnection | None = field(default=None, repr=False)

    def request(self, host: str, body: bytes | dict | None = None, headers: dict[str, str] | None = None,
                proxy_form: bool = True, method: str = "POST", path: str = "/") -> Response:
        """Send one request through Envoy: proxy form (`curl -x`) or origin form with a Host header."""
        payload = json.dumps(body).encode() if isinstance(body, dict) else body
        hdrs = {"content-type": "application/json", **(headers or {})}
        target = f"http://{host}{path}" if proxy_form else path
        if not proxy_form:
            hdrs["host"] = host
        for attempt in range(2):
            conn = self._conn or http.client.HTTPConnection("127.0.0.1", self.listen_port, timeout=30)
            try:
                conn.request(method, target, body=payload, headers=hdrs)
                resp = conn.getresponse()
                data = resp.read()
            except (ConnectionError, http.client.RemoteDisconnected, BrokenPipeError):
                conn.close()
                self._conn = None
                if attempt:
                    raise
                continue
            if resp.getheader("connection", "").lower() == "close":
                conn.close()
                self._conn = None
            else:
                self._conn = conn
            return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)
        raise AssertionError("unreachable")

    def admin(self, path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple[str, frozenset], float]:
        """Every sample of /metrics, keyed by (name, frozenset of label items)."""
        from prometheus_client.parser import text_string_to_metric_families

        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        return {(s.name, frozenset(s.labels.items())): s.value
                for family in text_string_to_metric_families(text) for s in family.samples}

    def access_entries(self) -> list[dict]:
        if self.access_log is None or not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> int:
        if self._conn:
            self._conn.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_gateway(config: Path | list[Path], tmp: Path, env: dict[str, str], extra: list[str] = (),
                  wait: bool = True, attempts: int = 3) -> Gateway:
    """`extproc up` on free ports. A port taken between choosing and binding it (another process
    was quicker) is retried with new ports; any other failure to start fails the test."""
    for attempt in range(attempts):
        gateway = _start_gateway_once(config, tmp, env, extra)
        if not wait:
            return gateway
        try:
            wait_until(lambda gateway=gateway: gateway.process.poll() is not None or "ready:" in gateway.log(), 30,
                       lambda gateway=gateway: f"gateway did not start:\n{gateway.log()}")
        except AssertionError:
            gateway.stop()  # not handed to the test: stopped here, never left running
            raise
        if gateway.process.poll() is None:
            return gateway
        if "in use" not in gateway.log() or attempt == attempts - 1:
            raise AssertionError(f"gateway exited with {gateway.process.returncode}:\n{gateway.log()}")
    raise AssertionError("unreachable")


def _start_gateway_once(config: Path | list[Path], tmp: Path, env: dict[str, str], extra) -> Gateway:
    listen, admin, metrics = free_port(), free_port(), free_port()
    access_log = tmp / f"access-{listen}.log"
    configs = config if isinstance(config, list) else [config]
    args = [sys.executable, "-m", "extproc", "up", "--listen", f"127.0.0.1:{listen}",
            "--admin", f"127.0.0.1:{admin}", "--concurrency", "1", "--metrics", f"127.0.0.1:{metrics}",
            "--access-log", str(access_log), *extra]
    for c in configs:
        args += ["--config", str(c)]
    log_file = tmp / f"gateway-{listen}.log"
    process = subprocess.Popen(args, stdout=log_file.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **env}, cwd=tmp)
    return Gateway(process, listen, admin, log_file, metrics, access_log)


def wait_until(predicate, timeout: float, message=lambda: "condition not met", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(message())
