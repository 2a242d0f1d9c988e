"""`extproc demo`: the whole gateway on one machine with no network and no keys.

Local HTTPS fake providers stand in for DashScope and Moonshot, with certificates from a
throwaway CA that only this run trusts; the seed's manifests are loaded unchanged, their
`${...}` keys set to random values the fakes check. Fakes of Anthropic's, Gemini's, Bedrock's and
Azure OpenAI's APIs stand in for providers of those (`apis/`, docs/translation.md). `--config`
adds the user's own manifests (a failover route, a budget) without editing the repository.
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
from .model_server import ModelServerFarm

PROVIDERS = {
    # host: (fake's name, the seed's key variable)
    "dashscope.aliyuncs.com": ("dashscope", "YOUR_DASHSCOPE_API_KEY"),
    "api.moonshot.cn": ("moonshot", "YOUR_MOONSHOT_API_KEY"),
}
# The providers of other APIs (extproc/demo/apis, docs/translation.md): host -> (fake's name, its API,
# its key variable)
API_PROVIDERS = {
    "api.anthropic.com": ("claude", "anthropic", "DEMO_ANTHROPIC_API_KEY"),
    "generativelanguage.googleapis.com": ("gemini", "gemini", "DEMO_GEMINI_API_KEY"),
    "bedrock-runtime.us-east-1.amazonaws.com": ("bedrock", "bedrock", "DEMO_AWS_ACCESS_KEY_ID"),
    "demo.openai.azure.com": ("azure", "azure", "DEMO_AZURE_OPENAI_KEY"),
}


def manifests_dir() -> Path:
    return Path(str(resources.files(__package__) / "manifests"))


def apis_dir() -> Path:
    """The demo's providers of Anthropic's, Gemini's, Bedrock's and Azure OpenAI's APIs, and a route
    over all of them (docs/translation.md)."""
    return Path(str(resources.files(__package__) / "apis"))


def prices_dir() -> Path:
    """The example LLMPriceTable for the seed's models (placeholder prices, not the providers')."""
    return Path(str(resources.files(__package__) / "prices"))


def policies_dir() -> Path:
    """The demo's own LLMDataPolicy, beside the seed's manifests (which stay as the seed has them)."""
    return Path(str(resources.files(__package__) / "policies"))


def start_fakes(workdir: Path) -> tuple[ThrowawayCA, dict[str, FakeProvider], dict[str, str]]:
    """A CA and one fake per seed provider. Returns them and the key variables to set."""
    ca = ThrowawayCA(workdir / "pki")
    fakes, env = {}, {}
    for host, (name, variable) in PROVIDERS.items():
        cert = ca.issue([host])
        key = "sk-demo-" + secrets.token_hex(12)
        fakes[host] = FakeProvider(name, cert.cert_file, cert.key_file, api_key=key).start()
        env[variable] = key
    for host, (name, api, variable) in API_PROVIDERS.items():
        cert = ca.issue([host])
        key = secrets.token_hex(16)
        env[variable] = key
        if api == "bedrock":
            env["DEMO_AWS_SECRET_ACCESS_KEY"] = secret = secrets.token_hex(20)
            fake = FakeProvider(name, cert.cert_file, cert.key_file, api=api, aws_access_key_id=key,
                                aws_secret_access_key=secret)
        else:
            fake = FakeProvider(name, cert.cert_file, cert.key_file, api_key=key, api=api,
                                azure_deployments={"gpt4o-demo": "gpt-4o"})
        fakes[host] = fake.start()
    return ca, fakes, env


MODELS_HOST = "qwen.local"


def model_servers(workdir: Path) -> tuple[ModelServerFarm, Path]:
    """Three simulated vLLM-like model servers (127.0.0.11, .12, .13) and a config directory with
    an InferencePool of them (its endpoints annotation) and a route to it (docs/in-cluster-models.md)."""
    farm = ModelServerFarm(3)
    config = workdir / "models"
    config.mkdir()
    endpoints = ", ".join(server.address for server in farm.servers)
    (config / "qwen-pool.yaml").write_text(f"""apiVersion: inference.networking.k8s.io/v1
kind: InferencePool
metadata:
  name: qwen
  annotations:
    llm-gateway.dev/endpoints: "{endpoints}"
spec:
  selector:
    matchLabels: {{app: qwen}}
  targetPorts: [{{number: 8000}}]
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata:
  name: qwen-local
spec:
  host: {MODELS_HOST}
  rules:
  - backendRefs:
    - backendRef: {{group: inference.networking.k8s.io, kind: InferencePool, name: qwen}}
      weight: 90
    - providerHost: dashscope.aliyuncs.com
      weight: 10
""")
    return farm, config


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

Data protection (docs/data-protection.md): a card and an email masked before they leave (the fake
echoes what it received), a provider key refused with a 400:
  curl -x {proxy} http://dashscope.aliyuncs.com -H 'x-fake-echo: 1' \\
    --data '{{"messages": [{{"role": "user", "content": "Card 4111 1111 1111 1111, mail jane@example.com"}}]}}'
  curl -x {proxy} http://dashscope.aliyuncs.com \\
    --data '{{"messages": [{{"role": "user", "content": "my key is sk-0123456789abcdef0123456789"}}]}}'
... and answers on their way back (the fake answers what x-fake-reply says), a stream as it comes:
  curl -N -x {proxy} http://dashscope.aliyuncs.com -H 'x-fake-reply: Your card 4111 1111 1111 1111 is on file' \\
    --data '{{"messages": [{{"role": "user", "content": "Which card?"}}], "stream": true}}'

An OpenAI base URL: embeddings, and the model list the gateway answers itself (docs/api.md):
  curl -x {proxy} http://dashscope.aliyuncs.com/compatible-mode/v1/embeddings \\
    -H 'Content-Type: application/json' --data '{{"model": "text-embedding-v3", "input": "Hi"}}'
  curl -x {proxy} http://demo-llm-server/v1/models

Any API behind one route, any client in front (docs/translation.md): an OpenAI request to the
Anthropic fake, streamed; an Anthropic Messages request to the Gemini fake; either to
demo-any-api, whose rule picks among DashScope, Anthropic, Gemini, Bedrock and Azure OpenAI:
  curl -N -x {proxy} http://api.anthropic.com/v1/chat/completions -H 'Content-Type: application/json' \
    --data '{{"messages": [{{"role": "user", "content": "Hi"}}], "stream": true}}'
  curl -x {proxy} http://generativelanguage.googleapis.com/v1/messages -H 'Content-Type: application/json' \
    --data '{{"model": "any", "max_tokens": 100, "messages": [{{"role": "user", "content": "Hi"}}]}}'
  curl -x {proxy} http://demo-any-api/v1/messages -H 'Content-Type: application/json' \
    --data '{{"model": "any", "max_tokens": 100, "messages": [{{"role": "user", "content": "Hi"}}]}}'

In-cluster model servers (docs/in-cluster-models.md): 90% to three simulated vLLM servers behind an
InferencePool, the server picked per request by its load (the answer's x-model-server header
names it), 10% to DashScope:
  curl -si -x {proxy} http://{MODELS_HOST} \\
    --data '{{"model": "base-model", "messages": [{{"role": "user", "content": "Hi"}}]}}'
"""


async def run_demo(listen: HostPort, admin: HostPort, metrics: HostPort | None,
                   otlp_endpoint: str | None = None, config: list[str] | None = None) -> int:
    """`config`: the user's own manifests, loaded after the seed's (an object of the same kind,
    namespace and name replaces the seed's; their providers on the seed's two hosts reach the fakes)."""
    workdir = Path(tempfile.mkdtemp(prefix="llm-gateway-demo-"))
    fakes: dict[str, FakeProvider] = {}
    farm: ModelServerFarm | None = None
    try:
        ca, fakes, env = start_fakes(workdir)
        farm, models = model_servers(workdir)
        os.environ.update(env)
        upstream = UpstreamOptions(
            ca_file=str(ca.cert_file),
            resolve={host: HostPort("127.0.0.1", fake.port) for host, fake in fakes.items()},
        )
        access_log = workdir / "access.log"
        opts = UpOptions(config=[str(manifests_dir()), str(prices_dir()), str(policies_dir()), str(apis_dir()),
                                 str(models), *(config or [])],
                         listen=listen,
                         admin=admin, upstream=upstream, metrics=metrics, access_log=str(access_log),
                         otlp_endpoint=otlp_endpoint)

        def ready() -> None:
            extra = f", then {', '.join(config)}" if config else ""
            print(f"\nLLM gateway demo is up. Config: {manifests_dir()} (the seed's manifests), "
                  f"{prices_dir()} (example prices, not the providers'), {policies_dir()} (a data policy) and "
                  f"{apis_dir()} (providers of other APIs){extra}")
            print("Fake providers: " + ", ".join(f"{h} -> 127.0.0.1:{f.port}" for h, f in fakes.items()))
            assert farm is not None
            print("Simulated model servers: " + ", ".join(s.address for s in farm.servers)
                  + f" (config: {models}; their candidates and scores now: "
                  f"extproc route --config {models} --host {MODELS_HOST})")
            print("  steered by request headers: x-fake-fail: dashscope:503, x-fake-total-tokens: 17, ... "
                  "(docs/cli.md, the demo's fake providers)")
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
            print(f"Access log:   tail -f {access_log}   (one JSON line per request: route, model, tokens, cost;"
                  " written within about a second)")
            print(f"Envoy stats:  curl -s http://{admin}/stats | grep llm_provider_")
            print("Ctrl-C stops it.", flush=True)

        return await run_up(opts, on_ready=ready)
    finally:
        for fake in fakes.values():
            fake.stop()
        if farm is not None:
            farm.stop()
        shutil.rmtree(workdir, ignore_errors=True)
