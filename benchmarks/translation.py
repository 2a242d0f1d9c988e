"""What a translated stream costs per event, beside an untranslated one (issue 27): `python -m
benchmarks translation`.

One gateway (`extproc up`, its Envoy a child), local HTTPS fake providers of each API in this
process (their CPU is not counted), and streamed chat requests whose answers have `--words`
content events each, sent one after another over one connection. For each pair of client and
provider API, the CPU time of Envoy and of the ext_proc process (from /proc) over `--streams`
streams, divided by the content events the client received: µs per event. Rounds interleave the
pairs (`--rounds`); the figure is each pair's median.

- openai -> openai: untranslated; Envoy reads the usage itself, the ext_proc sees no event;
- anthropic, gemini, bedrock -> openai: the provider's events translated into OpenAI's chunks by
  the answer exchange, piece by piece (Envoy's answer filter in STREAMED mode);
- openai -> anthropic: an Anthropic client's request to an OpenAI provider, its chunks written
  as Anthropic's events;
- anthropic -> anthropic: passed on unchanged, its usage read.

CPU time over a fixed workload holds up on a shared machine; the absolute figures vary with it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .measure import Processes, median, per_us, wait_http

KEYS = {"COMPAT_KEY": "sk-" + secrets.token_hex(8), "ANTHROPIC_KEY": "sk-ant-" + secrets.token_hex(8),
        "GEMINI_KEY": "g-" + secrets.token_hex(8), "AWS_ID": "AKIA" + secrets.token_hex(8).upper(),
        "AWS_SECRET": secrets.token_hex(20)}
HOSTS = {"openai": "api.compat.test", "anthropic": "api.anthropic.com", "gemini": "generativelanguage.googleapis.com",
         "bedrock": "bedrock-runtime.us-east-1.amazonaws.com"}
CONFIG = """
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: compat}
spec: {host: api.compat.test, configs: {defaultConfig: {openAIConfig: {model: m, apiKey: "${COMPAT_KEY}"}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: claude}
spec: {host: api.anthropic.com, configs: {defaultConfig: {anthropicConfig: {model: m, apiKey: "${ANTHROPIC_KEY}"}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: gemini}
spec: {host: generativelanguage.googleapis.com,
       configs: {defaultConfig: {geminiConfig: {model: m, apiKey: "${GEMINI_KEY}"}}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: bedrock}
spec:
  host: bedrock-runtime.us-east-1.amazonaws.com
  configs: {defaultConfig: {bedrockConfig: {model: m, region: us-east-1, accessKeyId: "${AWS_ID}",
                                            secretAccessKey: "${AWS_SECRET}"}}}
"""
# (client API, provider API) pairs, the untranslated one first
PAIRS = (("openai", "openai"), ("openai", "anthropic"), ("openai", "gemini"), ("openai", "bedrock"),
         ("anthropic", "openai"), ("anthropic", "anthropic"))


def label(pair: tuple[str, str]) -> str:
    client, provider = pair
    return f"{provider} -> {client}"


def start_fakes(workdir: Path):
    from extproc.demo.ca import ThrowawayCA
    from extproc.demo.fake_provider import FakeProvider

    ca = ThrowawayCA(workdir / "pki")
    options = {"openai": dict(api="openai", api_key=KEYS["COMPAT_KEY"]),
               "anthropic": dict(api="anthropic", api_key=KEYS["ANTHROPIC_KEY"]),
               "gemini": dict(api="gemini", api_key=KEYS["GEMINI_KEY"]),
               "bedrock": dict(api="bedrock", aws_access_key_id=KEYS["AWS_ID"],
                               aws_secret_access_key=KEYS["AWS_SECRET"])}
    fakes = {}
    for api, kw in options.items():
        cert = ca.issue([HOSTS[api]])
        fakes[api] = FakeProvider(api, cert.cert_file, cert.key_file, **kw).start()
    return ca, fakes


def start_gateway(workdir: Path, ca, fakes) -> tuple[subprocess.Popen, int]:
    from extproc.testing.ports import free_port

    (workdir / "config.yaml").write_text(CONFIG)
    port, admin = free_port(), free_port()
    args = [sys.executable, "-m", "extproc", "up", "--config", str(workdir / "config.yaml"), "--listen",
            f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", "--metrics", "none", "--access-log", "none",
            "--upstream-ca", str(ca.cert_file)]
    for api, fake in fakes.items():
        args += ["--resolve", f"{HOSTS[api]}=127.0.0.1:{fake.port}"]
    process = subprocess.Popen(args, stdout=(workdir / "gateway.log").open("wb"), stderr=subprocess.STDOUT,
                               env={**os.environ, **KEYS})
    wait_http(f"http://127.0.0.1:{admin}/ready", process=process)
    return process, port


def run_streams(port: int, pair: tuple[str, str], streams: int, words: int) -> int:
    """`streams` streamed requests of `pair`, one after another; the content events received."""
    client, provider = pair
    reply = " ".join(f"w{i}" for i in range(words))
    if client == "openai":
        path = "/v1/chat/completions"
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    else:
        path = "/v1/messages"
        body = {"model": "m", "max_tokens": 10_000, "messages": [{"role": "user", "content": "Hi"}], "stream": True}
    payload = json.dumps(body).encode()
    headers = {"host": HOSTS[provider], "content-type": "application/json", "x-fake-reply": reply}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    received = 0
    for _ in range(streams):
        connection.request("POST", path, body=payload, headers=headers)
        response = connection.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{label(pair)}: {response.status} {data[:200]!r}")
        marker = b'"content":"w' if client == "openai" else b'"text_delta"'
        events = data.count(marker) or data.count(marker.replace(b":", b": "))
        if events < words:
            raise RuntimeError(f"{label(pair)}: {events} content events of {words}")
        received += events
    connection.close()
    return received


def measure(pid: int, port: int, pair: tuple[str, str], streams: int, words: int) -> dict:
    everything, ext_proc = Processes.of(pid), Processes.of(pid, descendants=False)
    all_before, ext_before = everything.cpu_seconds(), ext_proc.cpu_seconds()
    events = run_streams(port, pair, streams, words)
    all_used, ext_used = everything.cpu_seconds() - all_before, ext_proc.cpu_seconds() - ext_before
    return {"events": events, "all_us": per_us(all_used, events), "ext_proc_us": per_us(ext_used, events),
            "envoy_us": per_us(all_used - ext_used, events)}


def benchmark(streams: int, words: int, rounds: int, pairs=PAIRS) -> dict:
    workdir = Path(tempfile.mkdtemp(prefix="llm-gateway-translation-bench-"))
    ca, fakes = start_fakes(workdir)
    process = None
    try:
        process, port = start_gateway(workdir, ca, fakes)
        for pair in pairs:  # warm: the first stream of each pair pays for imports and connections
            run_streams(port, pair, 2, words)
        runs: dict[str, list[dict]] = {label(p): [] for p in pairs}
        for r in range(rounds):
            for pair in pairs[r % len(pairs):] + pairs[:r % len(pairs)]:
                runs[label(pair)].append(measure(process.pid, port, pair, streams, words))
        return {name: {key: round(median([run[key] for run in found]), 2)
                       for key in ("all_us", "ext_proc_us", "envoy_us")} | {"events": found[0]["events"]}
                for name, found in runs.items()}
    finally:
        if process is not None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for fake in fakes.values():
            fake.stop()


def table(results: dict) -> str:
    lines = [f"{'provider -> client':24s} {'µs/event, all':>14s} {'ext_proc':>9s} {'Envoy':>7s}"]
    for name, found in results.items():
        lines.append(f"{name:24s} {found['all_us']:14.1f} {found['ext_proc_us']:9.1f} {found['envoy_us']:7.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks translation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=20, help="streams per pair and round (default 20)")
    parser.add_argument("--words", type=int, default=200, help="content events per stream (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    started = time.monotonic()
    results = benchmark(args.streams, args.words, args.rounds)
    print(json.dumps(results, indent=2) if args.json else table(results))
    print(f"({args.rounds} rounds of {args.streams} streams of {args.words} events per pair, "
          f"{time.monotonic() - started:.0f} s)", file=sys.stderr)
    return 0
