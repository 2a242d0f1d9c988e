"""The benchmark behind scripts/bench-workers (see there). Reuses scripts/bench.py's parts."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import HOST, KEY, MESSAGES, bare_envoy_config, cpu_seconds, free_port, lua_script, stop_everything, wait_until_serving  # noqa: E402

from extproc.demo.ca import ThrowawayCA  # noqa: E402
from extproc.testing.envoy_fake import start_envoy_fake  # noqa: E402
from extproc.testing.load import run_wrk  # noqa: E402
from extproc.demo.run import manifests_dir  # noqa: E402
from extproc.envoy.addresses import HostPort
from extproc.envoy.bootstrap import bootstrap, BootstrapOptions  # noqa: E402
from extproc.ops.up import envoy_binary  # noqa: E402


def process_tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its children (the worker processes)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return cpu_seconds(pid) + sum(cpu_seconds(int(c)) for c in children)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llm-gateway-bench-workers-"))
    envoy = envoy_binary()
    ca = ThrowawayCA(work / "pki")
    fake_port = free_port()
    fake = start_envoy_fake(envoy, ca, [HOST], fake_port, free_port(), work)
    procs: list[subprocess.Popen] = []
    ports: dict[str, int] = {}
    serve_pids: dict[str, int] = {}
    config = work / "config"
    config.mkdir()
    shutil.copy(manifests_dir() / "01-LLMProvider.yaml", config)
    try:
        ports["bare"] = free_port()
        (work / "bare.json").write_text(json.dumps(bare_envoy_config(ports["bare"], free_port(), fake_port, ca.cert_file)))
        procs.append(subprocess.Popen([envoy, "-c", str(work / "bare.json"), "--disable-hot-restart", "--log-level", "error"],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        for workers in (1, 2):
            name = f"workers={workers}"
            control, ext_proc, listen = free_port(), free_port(), free_port()
            serve = subprocess.Popen(
                [sys.executable, "-m", "extproc", "serve", "--config", str(config), "--workers", str(workers),
                 "--listen", f"127.0.0.1:{control}", "--ext-proc-listen", f"127.0.0.1:{ext_proc}", "--metrics", "none",
                 "--upstream-ca", str(ca.cert_file), "--resolve", f"{HOST}=127.0.0.1:{fake_port}"],
                env={**os.environ, "YOUR_DASHSCOPE_API_KEY": KEY}, stdout=(work / f"serve-{workers}.log").open("wb"),
                stderr=subprocess.STDOUT)
            procs.append(serve)
            serve_pids[name] = serve.pid
            boot = bootstrap(BootstrapOptions(listen=HostPort("127.0.0.1", listen), admin=HostPort("127.0.0.1", free_port()),
                                              control=HostPort("127.0.0.1", control),
                                              ext_proc=HostPort("127.0.0.1", ext_proc), access_log=None))
            (work / f"envoy-{workers}.json").write_text(json.dumps(boot))
            procs.append(subprocess.Popen([envoy, "-c", str(work / f"envoy-{workers}.json"), "--disable-hot-restart",
                                           "--log-level", "error"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            ports[name] = listen
        script = work / "load.lua"
        script.write_text(lua_script("/", HOST, {"messages": MESSAGES}))
        for port in ports.values():
            wait_until_serving(port)
            run_wrk(port, script, 4, 3)  # warm up
        rps: dict[str, list[float]] = {n: [] for n in ports}
        cpu = {n: [0.0, 0] for n in serve_pids}
        names = list(ports)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                before = process_tree_cpu(serve_pids[name]) if name in serve_pids else None
                result = run_wrk(ports[name], script, args.connections, args.seconds)
                if before is not None:
                    cpu[name][0] += process_tree_cpu(serve_pids[name]) - before
                    cpu[name][1] += result["requests"]
                rps[name].append(result["rps"])
                print(f"round {r + 1} {name:10s}: {result['rps']:8.0f} req/s  p50 {result['p50_ms']:.2f} ms  "
                      f"errors {result['errors']}", flush=True)
        bare = sum(rps["bare"]) / len(rps["bare"])
        print(f"\n{os.cpu_count()} cores, c={args.connections}, {args.rounds} rounds of {args.seconds}s")
        for name in serve_pids:
            mean = sum(rps[name]) / len(rps[name])
            print(f"{name:10s}: {mean:8.0f} req/s = {mean / bare:.2f} x bare Envoy ({bare:.0f} req/s); "
                  f"ext_proc CPU {1e6 * cpu[name][0] / max(cpu[name][1], 1):.0f} us per request (all processes)")
        return 0
    finally:
        stop_everything(procs, fake, work, wait_s=30)


if __name__ == "__main__":
    sys.exit(main())
