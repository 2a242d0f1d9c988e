"""Providers found by DNS, for tests and benches: a local DNS server (`extproc.testing.dns_server`) that
`extproc up --dns-resolver` points Envoy and the gateway at, and HTTPS fake providers on port
443 of a loopback address of their own (127.x.y.z), as a real provider is reached at its
name's address on 443. Port 443 needs root, as the tests run (network namespaces need it too)."""

from __future__ import annotations

import errno
import random
from pathlib import Path

from extproc.demo.ca import ThrowawayCA
from extproc.demo.fake_provider import FakeProvider


def loopback_provider(ca: ThrowawayCA, names: list[str], name: str, api_key: str) -> FakeProvider:
    """A fake provider on <random 127.x.y.z>:443 with a certificate for `names` (wildcards allowed)."""
    cert = ca.issue(names)
    for _ in range(20):
        address = f"127.{random.randint(1, 254)}.{random.randint(1, 254)}.{random.randint(2, 254)}"
        try:
            return FakeProvider(name, cert.cert_file, cert.key_file, api_key=api_key, host=address, port=443).start()
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
    raise AssertionError("no free loopback address for port 443")


def provider_docs(hosts: list[str], key: str, model: str = "m-1") -> str:
    """LLMProvider objects for `hosts` (names p-0, p-1, ...), one YAML stream."""
    return "---\n".join(f"""apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata:
  name: p-{i}
spec:
  host: {host}
  path: /v1/chat/completions
  configs:
    defaultConfig:
      openAIConfig:
        model: {model}
        apiKey: {key}
""" for i, host in enumerate(hosts))


def write(config: Path, name: str, text: str) -> Path:
    config.mkdir(parents=True, exist_ok=True)
    path = config / name
    path.write_text(text)
    return path
