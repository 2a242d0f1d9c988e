"""The local recipes of docs/failover.md and docs/token-budgets.md ("Try it locally") run as
written: their manifests, given to `extproc demo --config` (what `scripts/demo --config` runs),
and their requests, against the demo's fake providers, give what the docs say. Only the ports
differ (free ones), and the test waits for the access log where a reader would wait a moment."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpers import REPO, Gateway, free_port, wait_until

DOCS = REPO / "docs"


def recipe(doc: str, title: str = "Try it locally") -> tuple[str, list[str]]:
    """The "Try it locally" section's manifest (its heredoc) and its shell blocks."""
    text = (DOCS / doc).read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.DOTALL)
    manifest = re.search(r"<<'EOF'\n(.*?)\nEOF\n", blocks[0], flags=re.DOTALL)
    assert manifest is not None and "scripts/demo --config" in blocks[0]
    return manifest.group(1), blocks[1:]


@pytest.fixture
def demo(tmp_path):
    started: list[subprocess.Popen] = []

    def start(manifest: str) -> Gateway:
        config = tmp_path / "mine"
        config.mkdir()
        (config / "manifest.yaml").write_text(manifest)
        listen, admin, metrics = free_port(), free_port(), free_port()
        log = tmp_path / "demo.log"
        env = {k: v for k, v in os.environ.items() if "API_KEY" not in k}
        process = subprocess.Popen([sys.executable, "-m", "extproc", "demo", "--config", str(config),
                                    "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
                                    "--metrics", f"127.0.0.1:{metrics}"],
                                   stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)
        started.append(process)
        gw = Gateway(process, listen, admin, log, metrics)
        wait_until(lambda: "Ctrl-C stops it." in gw.log() or process.poll() is not None, 30, gw.log)
        assert process.poll() is None, gw.log()
        assert f"then {config}" in gw.log()  # the demo says whose manifests it added
        return gw

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def shell(command: str, gw: Gateway) -> str:
    """A documented command, on this demo's ports."""
    command = command.replace("127.0.0.1:10000", f"127.0.0.1:{gw.listen_port}")
    command = command.replace("127.0.0.1:9464", f"127.0.0.1:{gw.metrics_port}")
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    return result.stdout


def commands(block: str) -> list[str]:
    """A block's commands, continuation lines joined."""
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip()]


def test_failover_recipe(demo):
    manifest, (requests,) = recipe("failover.md")
    gw = demo(manifest)
    ask, metrics = commands(requests)
    answer = shell(ask, gw)
    assert '"model": "moonshot-v1-8k"' in answer, answer
    access_log = Path(re.search(r"tail -f (\S+)", gw.log()).group(1))  # where the demo says it is

    def logged() -> list[dict]:
        lines = access_log.read_text().splitlines() if access_log.exists() else []
        entries = [json.loads(line) for line in lines if line.startswith("{")]
        return entries if len(entries) == 2 else []

    request, attempt = sorted(wait_until(logged, 10, gw.log), key=lambda e: e.get("kind", ""))
    assert request["tried"] == "dashscope.aliyuncs.com" and request["provider"] == "default/moonshot"
    assert attempt["kind"] == "attempt" and attempt["status"] == 503 and attempt["attempt"] == "1"
    wait_until(lambda: "llm_gateway_failovers_total{" in shell(metrics, gw), 10)
    assert re.search(r'llm_gateway_failovers_total\{.*provider="dashscope.aliyuncs.com".*\} 1\.0',
                     shell(metrics, gw))


def test_budget_recipe(demo):
    manifest, (requests,) = recipe("token-budgets.md")
    gw = demo(manifest)
    loop, bob = requests.split("done\n")
    ask = commands(loop.split("do\n", 1)[1].split("sleep 1")[0])[0]
    assert loop.strip().startswith("for i in 1 2 3 4") and "sleep 1" in loop
    seen = []
    for n in range(4):
        seen.append(shell(ask, gw).strip())
        if n < 3:  # where the docs sleep a second: each answer's 17 tokens charged, from the access log
            wait_until(lambda n=n: gw.metrics().get(("llm_gateway_budget_tokens_charged_total", frozenset({
                ("budget", "default/per-user"), ("rule", "everyone")}))) == 17 * (n + 1), 10)
    # as the docs say: 40, 23 and 6 tokens left, then the 429 with none
    assert seen == ["200 40", "200 23", "200 6", "429 0"]
    assert '"model": "qwen1.5-72b-chat"' in shell(commands(bob)[0], gw)


def test_cost_cap_recipe(demo):
    """docs/token-budgets.md, "Try a cost cap locally": the demo's placeholder prices, a cap of
    0.0001 CNY, answers of 0.000026: four pass, telling what was left, the fifth is refused."""
    manifest, (requests,) = recipe("token-budgets.md", "Try a cost cap locally")
    gw = demo(manifest)
    loop = requests.split("done\n")[0]
    ask = commands(loop.split("do\n", 1)[1].split("sleep 1")[0])[0]
    assert loop.strip().startswith("for i in 1 2 3 4 5") and "sleep 1" in loop
    seen = []
    for n in range(5):
        seen.append(shell(ask, gw).strip())
        if n < 4:  # where the docs sleep a second: the answer's cost charged, from the access log
            wait_until(lambda n=n: gw.metrics().get(("llm_gateway_budget_cost_charged_total", frozenset({
                ("budget", "default/spend-cap"), ("rule", "everyone"), ("currency", "CNY")})), 0)
                       >= 0.000026 * (n + 1) - 1e-12, 10)
    assert seen == ["200 0.0001", "200 0.000074", "200 0.000048", "200 0.000022", "429 0"]
