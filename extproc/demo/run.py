"""`extproc demo`: the whole gateway on one machine with no network and no keys.

Local HTTPS fake providers stand in for DashScope and Moonshot, with certificates from a
throwaway CA that only this run trusts; the seed's manifests are loaded unchanged, their
`${...}` keys set to random values the fakes check.
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from importlib import resources
from pathlib import Path

from ..envoy.addresses import HostPort
from ..envoy.clusters import UpstreamOptions
from ..ops.up import UpOptions, run_up
from .ca import ThrowawayCA
from .fake_provider import FakeProvider

PROVIDERS = {
    # host: (fake's name, the seed's key variable)
    "dashscope.aliyuncs.com": ("dashscope", "YOUR_DASHSCOPE_API_KEY"),
    "api.moonshot.cn": ("moonshot", "YOUR_MOONSHOT_API_KEY"),
}


def manifests_dir() -> Path:
    return Path(str(resources.files(__package__) / "manifests"))


def prices_dir() -> Path:
    """The example LLMPriceTable for the seed's models (placeholder prices, not the providers')."""
    return Path(str(resources.files(__package__) / "prices"))


def start_fakes(workdir: Path) -> tuple[ThrowawayCA, dict[str, FakeProvider], dict[str, str]]:
    """A CA and one fake per seed provider. Returns them and the key variables to set."""
    ca = ThrowawayCA(workdir / "pki")
    fakes, env = {}, {}
    for host, (name, variable) in PROVIDERS.items():
        cert = ca.issue([host])
        key = "sk-demo-" + secrets.token_hex(12)
        fakes[host] = FakeProvider(name, cert.cert_file, cert.key_file, api_key=key).start()
        env[variable] = key
    return ca, fakes, env


def curl_examples(listen: HostPort) -> str:
    proxy = f"http://{listen}"
    body = """'{"messages": [{"role": "user", "content": "Please introduce yourself."}]}'"""
    return f"""
Scenario 0, one provider (answer's model: qwen1.5-72b-chat):
  curl -x {proxy} http://dashscope.aliyuncs.com -H 'Content-Type: application/json' \\
    --data {body}

Scenario 1, route subscribers to another model (answer's model: qwen-turbo):
  curl -x {proxy} http://dashscope.aliyuncs.com -H 'Content-Type: application/json' \\
    -H 'user-type: subscriber' --data {body}

Scenario 2, 50/50 across providers (qwen1.5-72b-chat or moonshot-v1-8k):
  curl -x {proxy} http://demo-llm-server -H 'Content-Type: application/json' \\
    --data {body}

The same without a proxy setting, naming the host in a header:
  curl http://{listen}/ -H 'Host: demo-llm-server' -H 'Content-Type: application/json' --data {body}

An OpenAI base URL: embeddings, and the model list the gateway answers itself (docs/api.md):
  curl -x {proxy} http://dashscope.aliyuncs.com/compatible-mode/v1/embeddings \\
    -H 'Content-Type: application/json' --data '{{"model": "text-embedding-v3", "input": "Hi"}}'
  curl -x {proxy} http://demo-llm-server/v1/models
"""


async def run_demo(listen: HostPort, admin: HostPort, metrics: HostPort | None,
                   otlp_endpoint: str | None = None) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="llm-gateway-demo-"))
    fakes: dict[str, FakeProvider] = {}
    try:
        ca, fakes, env = start_fakes(workdir)
        os.environ.update(env)
        upstream = UpstreamOptions(
            ca_file=str(ca.cert_file),
            resolve={host: HostPort("127.0.0.1", fake.port) for host, fake in fakes.items()},
        )
        access_log = workdir / "access.log"
        opts = UpOptions(config=[str(manifests_dir()), str(prices_dir())], listen=listen, admin=admin,
                         upstream=upstream, metrics=metrics, access_log=str(access_log), otlp_endpoint=otlp_endpoint)

        def ready() -> None:
            print(f"\nLLM gateway demo is up. Config: {manifests_dir()} (the seed's manifests) and "
                  f"{prices_dir()} (example prices, not the providers')")
            print("Fake providers: " + ", ".join(f"{h} -> 127.0.0.1:{f.port}" for h, f in fakes.items()))
            print(curl_examples(listen))
            print("A streamed answer, read as it arrives:")
            print(f"  curl -N -x http://{listen} http://demo-llm-server --data "
                  "'{\"messages\": [{\"role\": \"user\", \"content\": \"Hi\"}], \"stream\": true}'\n")
            if metrics is not None:
                print(f"Metrics:      curl -s http://{metrics}/metrics | grep gen_ai_")
                print(f"Spend:        extproc spend --url http://{metrics}   (who spent what, by caller, model, "
                      "route)")
            if otlp_endpoint:
                print(f"Traces:       spans of every request and provider attempt go to {otlp_endpoint} (OTLP)")
            print(f"Access log:   tail -f {access_log}   (one JSON line per request: route, model, tokens, cost)")
            print(f"Envoy stats:  curl -s http://{admin}/stats | grep llm_provider_")
            print("Ctrl-C stops it.", flush=True)

        return await run_up(opts, on_ready=ready)
    finally:
        for fake in fakes.values():
            fake.stop()
        shutil.rmtree(workdir, ignore_errors=True)
