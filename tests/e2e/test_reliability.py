"""Faults and load with the real processes: Envoy crashing under `extproc up`, the ext_proc killed
under load (fail closed, then back by itself), and config changes every second under load."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from extproc.ops.up import envoy_binary
from extproc.testing.envoy_fake import start_envoy_fake
from extproc.testing.load import ROTATING_SEED_HOSTS_LUA, run_wrk
from support.auth_helpers import token_files
from support.helpers import CHAT, Gateway, free_port, provider_yaml, seed_dir, upstream_args, wait_until

DASHSCOPE, MOONSHOT = "dashscope.aliyuncs.com", "api.moonshot.cn"
LOAD_SECONDS = float(os.environ.get("LLM_GATEWAY_LOAD_SECONDS", "60"))


def envoy_pid(gw: Gateway) -> int:
    out = subprocess.run(["pgrep", "-P", str(gw.process.pid)], capture_output=True, text=True).stdout.split()
    assert out, "no Envoy child process"
    return int(out[0])


def test_up_restarts_a_crashed_envoy(tmp_path, gateway_factory, fresh_providers):
    gw = gateway_factory(seed_dir(tmp_path, "01"))
    assert gw.request(DASHSCOPE, CHAT).status == 200
    first = envoy_pid(gw)
    os.kill(first, signal.SIGKILL)
    wait_until(lambda: "restarting it" in gw.log(), 10, gw.log)
    wait_until(lambda: _ok(gw), 20, gw.log)
    assert envoy_pid(gw) != first
    wait_until(lambda: "envoy is back" in gw.log(), 10, gw.log)
    assert gw.process.poll() is None


def _ok(gw: Gateway) -> bool:
    try:
        fresh = Gateway(gw.process, gw.listen_port, gw.admin_port, gw.log_file)
        return fresh.request(DASHSCOPE, CHAT).status == 200
    except OSError:
        return False


class Load:
    """Client threads sending chat requests as fast as they can; every answer is classified."""

    def __init__(self, port: int, hosts: list[str], threads: int = 6):
        self.port, self.hosts, self.threads = port, hosts, threads
        self.counts: Counter = Counter()
        self.bad: list = []
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def __enter__(self) -> Load:
        self._workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        self.started = time.monotonic()
        for w in self._workers:
            w.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for w in self._workers:
            w.join(30)
        self.elapsed = time.monotonic() - self.started

    def _run(self, i: int) -> None:
        gw = Gateway(None, self.port, 0, None)  # its own keep-alive connection
        n = 0
        while not self._stop.is_set():
            host = self.hosts[(i + n) % len(self.hosts)]
            n += 1
            try:
                resp = gw.request(host, CHAT)
                outcome = ("ok" if resp.status == 200 else f"http_{resp.status}", resp)
            except OSError as exc:
                outcome = (f"error_{type(exc).__name__}", None)
            with self._lock:
                self.counts[outcome[0]] += 1
                if outcome[0] != "ok" and len(self.bad) < 20:
                    self.bad.append((host, outcome[0], outcome[1].body[:200] if outcome[1] else None))


def test_ext_proc_killed_under_load_fails_closed_and_comes_back(tmp_path, ca, fresh_providers, keys):
    control, ext_proc, listen, admin = free_port(), free_port(), free_port(), free_port()
    creds = token_files(tmp_path)
    env = {**os.environ, **keys}
    serve_cmd = [sys.executable, "-m", "extproc", "serve", "--config", str(seed_dir(tmp_path, "01")),
                 "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}",
                 "--auth-token-file", str(creds.token_file), "--metrics", "none",
                 *upstream_args(ca, fresh_providers)]
    serve = subprocess.Popen(serve_cmd, stdout=(tmp_path / "serve.log").open("wb"), stderr=subprocess.STDOUT, env=env)
    boot = subprocess.run([sys.executable, "-m", "extproc", "envoy-config", "--control", f"127.0.0.1:{control}",
                           "--ext-proc", f"127.0.0.1:{ext_proc}", *creds.envoy_config_args(),
                           "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}", "--access-log", "none"],
                          capture_output=True, check=True).stdout
    (tmp_path / "envoy.json").write_bytes(boot)
    envoy = subprocess.Popen([envoy_binary(), "-c", str(tmp_path / "envoy.json"), "--disable-hot-restart",
                              "--concurrency", "1", "--log-level", "error"], stdout=subprocess.DEVNULL,
                             stderr=(tmp_path / "envoy.log").open("wb"))
    gw = Gateway(envoy, listen, admin, tmp_path / "envoy.log")
    try:
        wait_until(lambda: _ok(gw), 20, lambda: (tmp_path / "serve.log").read_text())
        with Load(listen, [DASHSCOPE], threads=4) as load:
            time.sleep(2)
            serve.kill()
            serve.wait()
            down_at = sum(load.counts.values())
            time.sleep(3)
            during = Counter(load.counts)
            serve = subprocess.Popen(serve_cmd, stdout=(tmp_path / "serve2.log").open("wb"), stderr=subprocess.STDOUT,
                                     env=env)
            wait_until(lambda: load.counts["ok"] > during["ok"] + 20, 30,
                       lambda: f"service did not come back: {load.counts}")
        print(f"\next_proc kill under load: {dict(load.counts)} over {load.elapsed:.1f}s; {down_at} before the kill")
        failed = {k: v for k, v in during.items() if k != "ok"}
        assert failed, "requests while the ext_proc was down should have failed"
        assert set(failed) <= {"http_500", "http_503"}, load.bad  # JSON errors, no hangs, no resets
        # nothing reached the provider without its key or its model
        for seen in fresh_providers[DASHSCOPE].requests:
            assert seen.headers["authorization"] == f"Bearer {keys['YOUR_DASHSCOPE_API_KEY']}"
            assert seen.body["model"] == "qwen1.5-72b-chat"
    finally:
        serve.kill()
        envoy.terminate()
        envoy.wait(10)


def test_config_changes_every_second_under_load_fail_nothing(tmp_path, gateway_factory, ca):
    assert shutil.which("wrk"), "wrk is missing: apt-get install wrk (scripts/test does)"
    # a fast provider (Envoy answering itself), so the gateway is what the load presses on
    fake = start_envoy_fake(envoy_binary(), ca, [DASHSCOPE, MOONSHOT], free_port(), free_port(), tmp_path)
    config = seed_dir(tmp_path, "01", "02", "03", "04", "05", "06")
    try:
        gw = gateway_factory(config, extra=["--access-log", "none", "--resolve", f"{DASHSCOPE}=127.0.0.1:{fake.port}",
                                            "--resolve", f"{MOONSHOT}=127.0.0.1:{fake.port}"])
        _changes_under_load(gw, config, tmp_path)
    finally:
        fake.stop()


def _changes_under_load(gw: Gateway, config: Path, tmp_path: Path) -> None:
    provider = config / "03-LLMProvider-with-route-config.yaml"
    original = provider.read_text()
    extra = config / "07-extra.yaml"
    script = tmp_path / "load.lua"
    script.write_text(ROTATING_SEED_HOSTS_LUA)
    changes = 0
    result: dict = {}
    load = threading.Thread(target=lambda: result.update(run_wrk(gw.listen_port, script, 8, LOAD_SECONDS)))
    load.start()
    deadline = time.monotonic() + LOAD_SECONDS - 1
    while time.monotonic() < deadline:
        time.sleep(1)
        changes += 1
        step = changes % 3
        if step == 0:  # a model change
            provider.write_text(original.replace("qwen1.5-72b-chat", f"qwen-v{changes}"))
        elif step == 1:  # a provider added (a new cluster)
            extra.write_text(provider_yaml("extra", f"extra{changes}.example.com", "extra-model", "sk-extra"))
        else:  # and removed again
            extra.unlink(missing_ok=True)
    load.join(LOAD_SECONDS + 90)
    print(f"\nconfig changes under load: {changes} changes, {result}")
    assert result["requests"] > 0
    assert result["errors"] == 0, result
    assert result["rps"] >= 200, f"only {result['rps']:.0f} requests/s: the load was too light to mean much"
    assert changes >= (LOAD_SECONDS - 1) * 0.8
    assert gw.log().count("config reloaded") >= changes * 0.8
