"""`python -m benchmarks dashboard [--out docs/images/dashboard.png] [--seconds 40]`: the
dashboard's panels (dashboards/llm-gateway.json) drawn from a real run's /metrics, so a reader
sees it before installing Grafana.

It starts `extproc up` on the seed's manifests, the example prices, a budget and a failover
route, in front of the demo's fake providers; sends a mixed load (JSON and streamed chat,
embeddings, a failing provider, a small budget running out); scrapes /metrics every second; and
draws the panels' figures with matplotlib (installed on demand, as scripts/bench does).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from extproc.demo.ca import ThrowawayCA
from extproc.demo.fake_provider import FakeProvider
from extproc.demo.run import PROVIDERS, manifests_dir, prices_dir
from extproc.testing.ports import free_port

EXTRA = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: failover}
spec:
  host: failover
  rules:
  - name: main
    backendRefs: [{providerHost: dashscope.aliyuncs.com}]
    fallbackRefs: [{providerHost: api.moonshot.cn}]
    retries: {attempts: 1, retryOn: [5xx]}
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMTokenRateLimit
metadata: {name: per-user}
spec:
  host: api.moonshot.cn
  key: {header: x-user-id}
  rules: [{name: everyone, tokens: 400, per: 1h}]
"""


def _post(port: int, host: str, body: dict, headers: dict[str, str], path: str = "/") -> int:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                     headers={"host": host, "content-type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _load(port: int, stop: threading.Event, seed: int) -> None:
    chat = {"messages": [{"role": "user", "content": "Please introduce yourself in a few words."}]}
    users = ["alice", "bob", "carol"]
    n = seed
    while not stop.is_set():
        n += 1
        kind = n % 10
        if kind < 3:
            _post(port, "dashscope.aliyuncs.com", chat, {"x-fake-total-tokens": str(40 + n % 30)})
        elif kind < 5:
            _post(port, "dashscope.aliyuncs.com", {**chat, "stream": True},
                  {"x-fake-event-delay": "0.02", "user-type": "subscriber" if n % 4 == 0 else "regular"})
        elif kind == 5:
            _post(port, "demo-llm-server", chat, {})
        elif kind == 6:
            _post(port, "failover", chat, {"x-fake-fail": "dashscope:503/2"})
        elif kind == 7:
            _post(port, "api.moonshot.cn", chat, {"x-user-id": users[n % 3], "x-fake-total-tokens": "60"})
        elif kind == 8:
            _post(port, "dashscope.aliyuncs.com", {"model": "text-embedding-v3", "input": "a few words"}, {},
                  "/compatible-mode/v1/embeddings")
        else:
            _post(port, "dashscope.aliyuncs.com", chat, {"x-fake-status": "429"})


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        text = answer.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def run(seconds: float) -> list[tuple[float, dict]]:
    work = Path(tempfile.mkdtemp(prefix="llm-gateway-dashboard-"))
    ca = ThrowawayCA(work / "pki")
    fakes, env = {}, {}
    for host, (name, variable) in PROVIDERS.items():
        cert = ca.issue([host])
        key = "sk-dashboard-" + os.urandom(6).hex()
        fakes[host] = FakeProvider(name, cert.cert_file, cert.key_file, api_key=key).start()
        env[variable] = key
    (work / "extra.yaml").write_text(EXTRA)
    listen, admin, metrics = free_port(), free_port(), free_port()
    args = [sys.executable, "-m", "extproc", "up", "--config", str(manifests_dir()), "--config", str(prices_dir()),
            "--config", str(work / "extra.yaml"), "--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}",
            "--metrics", f"127.0.0.1:{metrics}", "--access-log", "none", "--concurrency", "1",
            "--upstream-ca", str(ca.cert_file)]
    for host, fake in fakes.items():
        args += ["--resolve", f"{host}=127.0.0.1:{fake.port}"]
    log = (work / "gateway.log").open("wb")
    gateway = subprocess.Popen(args, env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT)
    samples: list[tuple[float, dict]] = []
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while b"ready:" not in (work / "gateway.log").read_bytes():
            if gateway.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "gateway.log").read_text())
            time.sleep(0.1)
        loaders = [threading.Thread(target=_load, args=(listen, stop, i * 3), daemon=True) for i in range(3)]
        for loader in loaders:
            loader.start()
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            time.sleep(1)
            samples.append((time.monotonic() - started, scrape(metrics)))
        stop.set()
        for loader in loaders:
            loader.join(30)
        time.sleep(1.5)  # the last access-log batch
        samples.append((time.monotonic() - started, scrape(metrics)))
    finally:
        stop.set()
        gateway.terminate()
        try:
            gateway.wait(20)
        except subprocess.TimeoutExpired:
            gateway.kill()
        for fake in fakes.values():
            fake.stop()
    return samples


def _sum(sample: dict, name: str, by: str | None = None, **match: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for (sample_name, labels), value in sample.items():
        found = dict(labels)
        if sample_name != name or any(found.get(k) != v for k, v in match.items()):
            continue
        key = found.get(by, "") if by else "all"
        out[key] = out.get(key, 0.0) + value
    return out


def _rates(samples: list[tuple[float, dict]], name: str, by: str | None = None, **match: str):
    """Per series: times and rates per second between scrapes."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for (t0, s0), (t1, s1) in zip(samples, samples[1:], strict=False):
        before, after = _sum(s0, name, by, **match), _sum(s1, name, by, **match)
        for key, value in after.items():
            times, values = series.setdefault(key, ([], []))
            times.append(t1)
            values.append(max(value - before.get(key, 0.0), 0.0) / (t1 - t0))
    return series


def _quantile(sample: dict, name: str, q: float) -> float | None:
    buckets = sorted((float(dict(labels)["le"]), value) for (n, labels), value in
                     _grouped(sample, name + "_bucket").items())
    if not buckets or buckets[-1][1] == 0:
        return None
    rank = q * buckets[-1][1]
    for le, count in buckets:
        if count >= rank:
            return le
    return None


def _grouped(sample: dict, name: str) -> dict:
    out: dict = {}
    for (sample_name, labels), value in sample.items():
        if sample_name == name:
            key = (name, (("le", dict(labels)["le"]),))
            out[key] = out.get(key, 0.0) + value
    return out


def draw(samples: list[tuple[float, dict]], path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "matplotlib"], check=True)
        import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    last = samples[-1][1]
    fig, axes = plt.subplots(3, 3, figsize=(16, 11))
    fig.suptitle("LLM gateway: dashboards/llm-gateway.json's panels, from a real run's /metrics "
                 "(fake providers, example prices)", fontsize=13)

    def lines(ax, series, title, unit="/s"):
        for key, (times, values) in sorted(series.items()):
            ax.plot(times, values, label=key or "-")
        ax.set_title(title)
        ax.set_xlabel("seconds")
        ax.set_ylabel(unit)
        if series:
            ax.legend(fontsize=7, loc="upper left")

    def bars(ax, values: dict[str, float], title: str, fmt: str = "%.6f"):
        names = list(values)
        drawn = ax.barh(names, [values[n] for n in names], color="#2a7ab0")
        ax.bar_label(drawn, fmt=fmt, fontsize=7)
        ax.set_title(title)
        ax.tick_params(axis="y", labelsize=7)

    lines(axes[0][0], _rates(samples, "llm_gateway_requests_total", "outcome"), "Requests per second, by outcome")
    errors = {}
    for (name, labels), value in last.items():
        found = dict(labels)
        if name == "llm_gateway_requests_total" and found.get("outcome") != "success":
            key = f"{found['outcome']} {found.get('error_type', '')}"
            errors[key] = errors.get(key, 0.0) + value
    bars(axes[0][1], errors, "Errors by cause (requests)", "%d")
    lines(axes[0][2], _rates(samples, "gen_ai_client_token_usage_sum", "gen_ai_token_type"),
          "Tokens per second, by type")
    cost_by_caller = {f"{k or '(gateway)'}": v for k, v in _sum(last, "llm_gateway_cost_total", "llm_caller").items()}
    bars(axes[1][0], cost_by_caller, "Cost by caller (CNY, example prices)")
    bars(axes[1][1], _sum(last, "llm_gateway_cost_total", "gen_ai_request_model"),
         "Cost by model (CNY, example prices)")
    quantiles = {}
    for metric, label in (("gen_ai_server_time_to_first_token_seconds", "time to first token"),
                          ("gen_ai_server_time_per_output_token_seconds", "time per output token")):
        for q in (0.5, 0.95):
            value = _quantile(last, metric, q)
            if value is not None:
                quantiles[f"{label} p{int(q * 100)}"] = value
    bars(axes[1][2], quantiles, "Streamed answers: seconds (bucket bounds)", "%.3f")
    failovers = {f"{dict(ls).get('provider')} {dict(ls).get('reason')}": v for (n, ls), v in last.items()
                 if n == "llm_gateway_failovers_total"}
    attempts = {f"{dict(ls).get('provider')} {dict(ls).get('result')}": v for (n, ls), v in last.items()
                if n == "llm_gateway_provider_attempts_total"}
    bars(axes[2][0], {**{f"failover: {k}": v for k, v in failovers.items()},
                      **{f"attempt: {k}": v for k, v in attempts.items()}}, "Failover and attempts by provider", "%d")
    refused = {f"{dict(ls).get('budget')} {dict(ls).get('reason')}": v for (n, ls), v in last.items()
               if n == "llm_gateway_budget_refused_total"}
    unpriced = _sum(last, "llm_gateway_spend_requests_total", "gen_ai_request_model", currency="")
    bars(axes[2][1], {**{f"budget refused: {k}": v for k, v in refused.items()},
                      **{f"unpriced: {k}": v for k, v in unpriced.items()}},
         "Budget rejections; unpriced answers", "%d")
    health = {dict(ls).get("provider", ""): v for (n, ls), v in last.items()
              if n == "llm_gateway_provider_cooling_down"}
    bars(axes[2][2], health, "Provider health (1: cooling down)", "%d")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks dashboard", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/images/dashboard.png", type=Path)
    parser.add_argument("--seconds", default=40.0, type=float)
    args = parser.parse_args(argv)
    samples = run(args.seconds)
    draw(samples, args.out)
    print(f"wrote {args.out} from {len(samples)} scrapes")
    return 0
