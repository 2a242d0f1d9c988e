"""A sidecar Envoy for end-to-end tests: the bootstrap of `extproc envoy-config --sidecar`, presenting
a given bearer token to a control plane over TCP (a ServiceAccount token, as the kubelet projects
it), with its own ports, access log and readiness listener."""

from __future__ import annotations

import http.client
import json
import subprocess
import sys
from pathlib import Path

from extproc.envoy.bootstrap import token_sds
from extproc.ops.up import envoy_binary
from extproc.testing.ports import free_port


class SidecarEnvoy:
    def __init__(self, tmp: Path, name: str, control: int, ext_proc: int, token: str):
        self.dir = tmp / name
        self.dir.mkdir()
        token_dir = self.dir / "token"
        token_dir.mkdir(mode=0o700)
        (token_dir / "token").write_text(token)
        sds = self.dir / "token-sds.json"
        sds.write_text(json.dumps(token_sds(str(token_dir / "token"))))
        self.listen, self.admin, readiness = free_port(), free_port(), free_port()
        self.access_log = self.dir / "access.log"
        self.log_file = self.dir / "envoy.log"
        boot = subprocess.run(
            [sys.executable, "-m", "extproc", "envoy-config", "--sidecar", "--control", f"127.0.0.1:{control}",
             "--ext-proc", f"127.0.0.1:{ext_proc}", "--listen", f"127.0.0.1:{self.listen}",
             "--admin", f"127.0.0.1:{self.admin}", "--readiness", f"127.0.0.1:{readiness}",
             "--access-log", str(self.access_log), "--token-file", str(token_dir / "token"), "--token-sds", str(sds)],
            capture_output=True, text=True, check=True).stdout
        (self.dir / "envoy.json").write_text(boot)
        self.process = subprocess.Popen([envoy_binary(), "-c", str(self.dir / "envoy.json"), "--disable-hot-restart",
                                         "--concurrency", "1", "--log-level", "warning"],
                                        stdout=subprocess.DEVNULL, stderr=self.log_file.open("wb"))

    def request(self, host: str, body: dict, headers: dict[str, str] | None = None) -> tuple[int, dict, dict]:
        """As an application sends it once intercepted: plain HTTP, the LLM host in Host. (status,
        JSON body, response headers)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.listen, timeout=30)
        try:
            conn.request("POST", "/", body=json.dumps(body),
                         headers={"host": host, "content-type": "application/json", **(headers or {})})
            response = conn.getresponse()
            data = response.read()
            return response.status, json.loads(data or b"null"), {k.lower(): v for k, v in response.getheaders()}
        except (ConnectionError, json.JSONDecodeError, OSError):
            return 0, {}, {}
        finally:
            conn.close()

    def access_entries(self) -> list[dict]:
        if not self.access_log.exists():
            return []
        return [json.loads(line) for line in self.access_log.read_text().splitlines() if line.strip()]

    def log(self) -> str:
        return self.log_file.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
