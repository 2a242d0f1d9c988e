"""`LLMRoute.spec.gateways` for the tests: two providers with their keys, two egress gateways, the
mesh's view and each gateway's, and a config compiled in one view."""

from __future__ import annotations

from extproc.config.compile import compile_config
from extproc.config.loader import load_paths
from extproc.policy.gateway_binding import View
from support.manifests import provider, write

EGRESS = "llm-gateway/egress"
EGRESS_ADDR = "10.0.0.7:8080"
OTHER = "llm-gateway/other"
MESH_VIEW = View(egress={EGRESS: EGRESS_ADDR, OTHER: "other.llm-gateway.svc.cluster.local:80"})
GATEWAY_VIEW = View(gateway=EGRESS)
OTHER_VIEW = View(gateway=OTHER)
A, B = "a.example.com", "b.example.com"
KEY_A, KEY_B = "sk-unit-a", "sk-unit-b"


def providers() -> list[dict]:
    return [provider("pa", A, "model-a", api_key=KEY_A), provider("pb", B, "model-b", api_key=KEY_B)]


def compiled(tmp_path, docs, view):
    objects, problems = load_paths([write(tmp_path / "c.yaml", *docs)], {})
    assert problems == []
    return compile_config(objects, view)
