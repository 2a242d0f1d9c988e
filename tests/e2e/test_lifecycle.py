"""Process lifecycle of `extproc up`: its Envoy dies with it however it dies, and ports that are
taken are said clearly instead of waited on."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

from extproc.envoy.addresses import HostPort
from extproc.ops.children import port_problem
from support.helpers import CHAT, Gateway, free_port, seed_dir, upstream_args, wait_until

DASHSCOPE = "dashscope.aliyuncs.com"


def _launch(config: Path, tmp: Path, env: dict, extra: list[str], listen: int, admin: int, metrics: int,
            name: str) -> Gateway:
    log_file = tmp / f"{name}.log"
    args = [sys.executable, "-m", "extproc", "up", "--config", str(config), "--listen", f"127.0.0.1:{listen}",
            "--admin", f"127.0.0.1:{admin}", "--metrics", f"127.0.0.1:{metrics}", "--concurrency", "1",
            "--access-log", "none", *extra]
    process = subprocess.Popen(args, stdout=log_file.open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **env}, cwd=tmp)
    return Gateway(process, listen, admin, log_file, metrics)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(p) for p in out]


def _gone(pid: int) -> bool:
    """Exited (a zombie waiting for a reaper counts: it holds no socket and runs no code)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _port_free(port: int) -> bool:
    return port_problem("--listen", HostPort("127.0.0.1", port)) is None


def _serves(gw: Gateway) -> bool:
    try:
        return gw.request(DASHSCOPE, CHAT).status == 200
    except OSError:
        return False


def test_envoy_dies_with_a_killed_up_and_a_new_up_serves_on_the_same_ports(tmp_path, ca, fresh_providers, keys):
    config = seed_dir(tmp_path, "01")
    extra = upstream_args(ca, fresh_providers)
    listen, admin, metrics = free_port(), free_port(), free_port()
    first = _launch(config, tmp_path, keys, extra, listen, admin, metrics, "first")
    second = None
    try:
        wait_until(lambda: "ready:" in first.log() or first.process.poll() is not None, 30, first.log)
        assert first.process.poll() is None, first.log()
        assert _serves(first)
        (envoy,) = _children(first.process.pid)

        first.process.send_signal(signal.SIGKILL)  # as the OOM killer would: no handler runs
        first.process.wait()
        wait_until(lambda: _gone(envoy), 10, lambda: f"Envoy {envoy} outlived its killed parent")
        wait_until(lambda: _port_free(listen), 10, lambda: f"port {listen} still held after Envoy died")

        second = _launch(config, tmp_path, keys, extra, listen, admin, metrics, "second")
        wait_until(lambda: "ready:" in second.log() or second.process.poll() is not None, 30, second.log)
        assert second.process.poll() is None, second.log()
        assert _serves(second)
    finally:
        for gw in (first, second):
            if gw is not None:
                gw.stop()
    assert second.process.returncode == 0, second.log()


def test_up_on_a_taken_port_exits_1_and_says_which(tmp_path, ca, fresh_providers, keys):
    config = seed_dir(tmp_path, "01")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    try:
        for flag_taken in ("listen", "admin"):
            ports = {"listen": free_port(), "admin": free_port(), "metrics": free_port()}
            ports[flag_taken] = taken
            gw = _launch(config, tmp_path, keys, upstream_args(ca, fresh_providers), ports["listen"],
                         ports["admin"], ports["metrics"], f"taken-{flag_taken}")
            try:
                assert gw.process.wait(30) == 1, gw.log()
            finally:
                gw.stop()
            log = gw.log()
            assert f"--{flag_taken} 127.0.0.1:{taken}: the port is in use" in log, log
            assert "Traceback" not in log
            assert not _children(gw.process.pid)
    finally:
        holder.close()


def test_up_stopped_with_sigterm_finishes_the_requests_in_flight(tmp_path, gateway_factory):
    import threading

    gw = gateway_factory(seed_dir(tmp_path, "01"))
    answers: list = []
    slow = threading.Thread(target=lambda: answers.append(
        Gateway(None, gw.listen_port, gw.admin_port, gw.log_file).request(DASHSCOPE, CHAT, {"x-fake-delay": "2"})))
    slow.start()
    wait_until(lambda: "downstream_rq_active: 1" in gw.admin("/stats?filter=http.llm_gateway.downstream_rq_active"),
               10)
    gw.process.send_signal(signal.SIGTERM)
    slow.join(30)
    assert gw.process.wait(30) == 0, gw.log()
    assert [a.status for a in answers] == [200], gw.log()
    assert "draining Envoy's listeners" in gw.log()
