"""What a newcomer meets on a fresh clone: the first run says it is installing instead of a
silent minute, and the README says where `extproc` is before it first uses the command."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def fake_venv(tmp_path: Path) -> tuple[Path, Path]:
    """A virtual environment whose python only records how it was called (no real install)."""
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    calls = tmp_path / "calls"
    python = venv / "bin" / "python"
    python.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    return venv, calls


def source_venv_script(venv: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", f"source {REPO / 'scripts' / '_venv.sh'}"], capture_output=True, text=True,
                          env={**os.environ, "LLM_GATEWAY_VENV": str(venv)}, timeout=30)


def test_the_first_run_says_what_it_installs_and_the_next_says_nothing(tmp_path):
    venv, calls = fake_venv(tmp_path)
    first = source_venv_script(venv)
    assert first.returncode == 0, first.stderr
    assert "installing the gateway and its test tools into" in first.stderr
    assert "about a minute" in first.stderr
    assert f"{venv}/bin/extproc is the command line" in first.stderr
    assert "pip install --quiet" in calls.read_text()  # pip itself stays quiet
    again = source_venv_script(venv)  # installed: not a word
    assert again.returncode == 0 and again.stderr == ""


def test_the_readme_says_where_extproc_is_before_using_it():
    """`extproc` is the package's entry point, in .venv/bin after scripts/demo or scripts/test:
    not on the PATH of a fresh shell, so the README says so where it first runs the command."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["extproc"] == "extproc.cli.main:main"
    readme = (REPO / "README.md").read_text()
    first_use = re.search(r"extproc (up|demo|validate|serve|route)\b", readme)
    assert first_use is not None
    start = readme.rfind("\n\n", 0, first_use.start())
    end = readme.find("\n\n", first_use.end())
    assert ".venv/bin/extproc" in readme[start:end], "say where `extproc` is (.venv/bin) where the README first uses it"
