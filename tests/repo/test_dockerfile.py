"""The image: there is no Docker engine here, so the Dockerfile is linted (hadolint) and read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dockerfile_passes_hadolint():
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "Dockerfile")], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_image_runs_as_non_root_with_extproc_as_entrypoint():
    lines = [line.strip() for line in (REPO / "Dockerfile").read_text().splitlines()]
    assert lines[[i for i, line in enumerate(lines) if line.startswith("FROM ")][0]].startswith("FROM python:3.11-slim")
    assert "USER 10001" in lines
    assert 'ENTRYPOINT ["extproc"]' in lines
    # the uids the sidecar manifests name exist in the image
    sidecar = (REPO / "k8s" / "sidecar" / "sidecar-patch.yaml").read_text()
    assert "runAsUser: 1337" in sidecar and "--uid 1337" in (REPO / "Dockerfile").read_text()
