"""A config with failover: a rule with `retries` tries provider a, then falls back to b (with the
rule's own config for b); compiled as `extproc up` would."""

from __future__ import annotations

from extproc.config.compile import compile_config
from extproc.config.loader import load_text

CONFIG = """
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: a}
spec:
  host: a.example.com
  outlierDetection: {consecutiveErrors: 5, baseEjectionTime: 1m}
  configs:
    defaultConfig: {openAIConfig: {model: ma, apiKey: ka}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: b}
spec:
  host: b.example.com
  timeout: 10s
  configs:
    defaultConfig: {openAIConfig: {model: mb, apiKey: kb}}
    routeSpecificConfigs:
      main: {openAIConfig: {model: mb-main}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: r}
spec:
  host: svc
  rules:
  - name: main
    backendRefs: [{providerHost: a.example.com}]
    fallbackRefs: [{providerHost: b.example.com}]
    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}
"""


def compiled(text: str):
    loaded, problems = load_text(text, "f.yaml")
    assert not problems, problems
    return compile_config(loaded)
