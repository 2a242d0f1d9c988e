"""The egress gateway's end-to-end tests' config: the seed's DashScope route bound to a gateway,
and the decoy key the mesh's control plane holds for the gateway's provider."""

from __future__ import annotations

import shutil
from pathlib import Path

from support.helpers import SEED_MANIFESTS

GATEWAY = "llm-gateway/egress"
DECOY = "sk-decoy-the-sidecar-must-never-send-this"


def gateway_bound_config(tmp_path: Path) -> Path:
    """The seed's DashScope provider and route, the route bound to the egress gateway; Moonshot's
    provider as it is (no route names it: the mesh decides it)."""
    config = tmp_path / "config"
    config.mkdir()
    for name in ("01-LLMProvider.yaml", "04-LLMProvider-moonshot.yaml"):
        shutil.copy(SEED_MANIFESTS / name, config / name)
    route = (SEED_MANIFESTS / "02-LLMRoute.yaml").read_text()
    (config / "02-LLMRoute.yaml").write_text(
        route.replace("spec:\n", f"spec:\n  gateways: [{GATEWAY}]\n", 1))
    return config
