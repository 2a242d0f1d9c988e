"""The soak run behind scripts/soak: a steady load through the whole gateway for MINUTES (default
10), with a config change every 10 seconds; prints requests, errors, and the ext_proc's and
Envoy's memory at the start and the end."""

from __future__ import annotations

import argparse
import shutil
import threading
import time

from extproc.demo.run import manifests_dir
from extproc.testing.load import ROTATING_SEED_HOSTS_LUA, run_wrk

from .contenders import Stage, start_gateway
from .measure import children, rss_mib

HOSTS = ("dashscope.aliyuncs.com", "api.moonshot.cn")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/soak", description=__doc__)
    parser.add_argument("minutes", nargs="?", type=float, default=10.0)
    minutes = parser.parse_args(argv).minutes
    with Stage("llm-gateway-soak-", hosts=HOSTS, wait_s=20) as stage:
        config = stage.work / "config"
        shutil.copytree(manifests_dir(), config)
        provider = config / "03-LLMProvider-with-route-config.yaml"
        original = provider.read_text()
        gateway = start_gateway(stage, "soak", config, resolve={host: stage.fake_port for host in HOSTS},
                                env={"YOUR_DASHSCOPE_API_KEY": "sk-soak-1", "YOUR_MOONSHOT_API_KEY": "sk-soak-2"})
        log = stage.work / "gateway-soak.log"
        deadline = time.monotonic() + 30
        while "ready:" not in log.read_text():
            if time.monotonic() > deadline or gateway.process.poll() is not None:
                print(log.read_text())
                return 1
            time.sleep(0.2)
        envoy_pid = children(gateway.process.pid)[0]
        script = stage.work / "load.lua"
        script.write_text(ROTATING_SEED_HOSTS_LUA)
        run_wrk(gateway.port, script, 4, 5)  # warm up, then measure from a steady state
        start = {"ext_proc": rss_mib(gateway.process.pid), "envoy": rss_mib(envoy_pid)}
        print(f"soak: {minutes:g} min, 4 connections, a config change every 10 s; memory at start (MiB): "
              f"ext_proc {start['ext_proc']:.1f}, Envoy {start['envoy']:.1f}", flush=True)
        stop = threading.Event()
        changes = [0]

        def change() -> None:
            while not stop.wait(10):
                changes[0] += 1
                provider.write_text(original.replace("qwen1.5-72b-chat", f"qwen-soak-{changes[0]}"))

        threading.Thread(target=change, daemon=True).start()
        load = run_wrk(gateway.port, script, 4, minutes * 60, threads=1)
        stop.set()
        end = {"ext_proc": rss_mib(gateway.process.pid), "envoy": rss_mib(envoy_pid)}
        print(f"requests: {load['requests']} ({load['rps']:.0f}/s, p99 {load['p99_ms']:.1f} ms), errors: "
              f"{load['non_2xx']} non-2xx, {load['socket_errors']} socket; config changes: {changes[0]}")
        for name in ("ext_proc", "envoy"):
            growth = 100 * (end[name] - start[name]) / start[name]
            print(f"memory {name}: {start[name]:.1f} MiB -> {end[name]:.1f} MiB ({growth:+.1f}%)")
        return 0 if load["errors"] == 0 else 1
