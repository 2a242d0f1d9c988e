"""The soak run behind scripts/soak: see there."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from extproc.demo.ca import ThrowawayCA
from extproc.testing.envoy_fake import start_envoy_fake
from extproc.testing.load import ROTATING_SEED_HOSTS_LUA, run_wrk
from extproc.demo.run import manifests_dir
from extproc.ops.up import envoy_binary

HOSTS = ("dashscope.aliyuncs.com", "api.moonshot.cn")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def main() -> int:
    minutes = float(sys.argv[1]) if len(sys.argv) > 1 else 10.0
    work = Path(tempfile.mkdtemp(prefix="llm-gateway-soak-"))
    ca = ThrowawayCA(work / "pki")
    fake = start_envoy_fake(envoy_binary(), ca, list(HOSTS), free_port(), free_port(), work)
    config = work / "config"
    shutil.copytree(manifests_dir(), config)
    provider = config / "03-LLMProvider-with-route-config.yaml"
    original = provider.read_text()
    listen, admin = free_port(), free_port()
    env = {**os.environ, "YOUR_DASHSCOPE_API_KEY": "sk-soak-1", "YOUR_MOONSHOT_API_KEY": "sk-soak-2"}
    args = [sys.executable, "-m", "extproc", "up", "--config", str(config), "--listen", f"127.0.0.1:{listen}",
            "--admin", f"127.0.0.1:{admin}", "--metrics", "none", "--access-log", "none", "--upstream-ca", str(ca.cert_file)]
    for host in HOSTS:
        args += ["--resolve", f"{host}=127.0.0.1:{fake.port}"]
    gateway = subprocess.Popen(args, env=env, stdout=(work / "gateway.log").open("wb"), stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while "ready:" not in (work / "gateway.log").read_text():
            if time.monotonic() > deadline or gateway.poll() is not None:
                print((work / "gateway.log").read_text())
                return 1
            time.sleep(0.2)
        envoy_pid = int(subprocess.run(["pgrep", "-P", str(gateway.pid)], capture_output=True, text=True).stdout.split()[0])
        script = work / "load.lua"
        script.write_text(ROTATING_SEED_HOSTS_LUA)
        run_wrk(listen, script, 4, 5)  # warm up, then measure from a steady state
        start = {"ext_proc": rss_mib(gateway.pid), "envoy": rss_mib(envoy_pid)}
        print(f"soak: {minutes:g} min, 4 connections, a config change every 10 s; memory at start (MiB): "
              f"ext_proc {start['ext_proc']:.1f}, Envoy {start['envoy']:.1f}", flush=True)
        stop = threading.Event()
        changes = [0]

        def change() -> None:
            while not stop.wait(10):
                changes[0] += 1
                provider.write_text(original.replace("qwen1.5-72b-chat", f"qwen-soak-{changes[0]}"))

        threading.Thread(target=change, daemon=True).start()
        load = run_wrk(listen, script, 4, minutes * 60, threads=1)
        stop.set()
        end = {"ext_proc": rss_mib(gateway.pid), "envoy": rss_mib(envoy_pid)}
        print(f"requests: {load['requests']} ({load['rps']:.0f}/s, p99 {load['p99_ms']:.1f} ms), errors: "
              f"{load['non_2xx']} non-2xx, {load['socket_errors']} socket; config changes: {changes[0]}")
        for name in ("ext_proc", "envoy"):
            growth = 100 * (end[name] - start[name]) / start[name]
            print(f"memory {name}: {start[name]:.1f} MiB -> {end[name]:.1f} MiB ({growth:+.1f}%)")
        return 0 if load["errors"] == 0 else 1
    finally:
        gateway.send_signal(signal.SIGTERM)
        gateway.wait(20)
        fake.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
