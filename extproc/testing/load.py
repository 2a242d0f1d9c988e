"""Load from wrk (a C load generator, so the client costs the machine little), for the load
tests, the soak and the benchmark: one way to run it and read its numbers."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

# Requests rotating over the seed's three hosts: both providers and the weighted route.
ROTATING_SEED_HOSTS_LUA = """
local hosts = {"dashscope.aliyuncs.com", "demo-llm-server", "api.moonshot.cn"}
local body = '{"messages": [{"role": "user", "content": "Please introduce yourself."}]}'
local n = 0
request = function()
  n = n + 1
  return wrk.format("POST", "/", {["Host"] = hosts[n % 3 + 1], ["Content-Type"] = "application/json"}, body)
end
"""


def _found(pattern: str, text: str, flags: int = 0) -> str:
    """The first group of `pattern` in wrk's output; wrk printed something else: say so."""
    m = re.search(pattern, text, flags)
    if m is None:
        raise RuntimeError(f"wrk's output has no {pattern!r}:\n{text}")
    return m.group(1)


def _ms(text: str) -> float:
    value, unit = _found(r"^([\d.]+)(us|ms|s|m)$", text), _found(r"^[\d.]+(us|ms|s|m)$", text)
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60000.0}[unit]


def run_wrk(port: int, script: Path, connections: int, seconds: float, threads: int | None = None) -> dict:
    """requests, rps, p50_ms, p99_ms and errors (non-2xx answers plus socket errors) of one wrk run."""
    threads = threads or (1 if connections == 1 else 2)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{int(seconds)}s", "--latency",
                          "--timeout", "10s",
                          "-s", str(script), f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=seconds + 60).stdout
    result: dict[str, float] = {
              "requests": int(_found(r"(\d+) requests in", out)),
              "rps": float(_found(r"Requests/sec:\s+([\d.]+)", out)),
              # the latency distribution's own lines (Thread Stats has percentages too)
              "p50_ms": _ms(_found(r"^\s+50%\s+(\S+)", out, re.M)),
              "p99_ms": _ms(_found(r"^\s+99%\s+(\S+)", out, re.M)),
              "non_2xx": 0, "socket_errors": 0}
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", out):
        result["non_2xx"] = int(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out):
        result["socket_errors"] = sum(int(x) for x in m.groups())
    result["errors"] = result["non_2xx"] + result["socket_errors"]
    return result
