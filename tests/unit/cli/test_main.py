"""The `extproc` command's subcommands that read a config and print: `validate`, `route`, `envoy-config`."""

from __future__ import annotations

import pytest

from extproc.cli.main import main
from extproc.policy.budgets import key_hash
from support.budget_docs import RULES, budget_doc
from support.manifests import DASHSCOPE, provider, write


def test_budget_on_route_alias_and_validate_route_commands(tmp_path, capsys):
    file = write(tmp_path / "c.yaml", provider("dashscope", DASHSCOPE, namespace="llm"),
                 {**budget_doc(RULES), "metadata": {"name": "per-user", "namespace": "llm"}})
    assert main(["validate", str(file)]) == 0
    assert "1 LLMTokenRateLimit" in capsys.readouterr().out
    assert main(["route", "--config", str(file), "--host", f"{DASHSCOPE}.llm", "-H", "x-user-id: alice"]) == 0
    out = capsys.readouterr().out
    assert f"budget llm/per-user: rule everyone: 40 tokens per 3600s, key {key_hash('alice')} (header x-user-id)" in out
    assert "alice" not in out


def test_max_ext_proc_streams_reaches_the_control_plane_clusters(capsys):
    import json

    from extproc.protocol import EXT_PROC_CLUSTER

    assert main(["envoy-config", "--max-ext-proc-streams", "2500"]) == 0
    boot = json.loads(capsys.readouterr().out)
    (cluster,) = [c for c in boot["static_resources"]["clusters"] if c["name"] == EXT_PROC_CLUSTER]
    assert cluster["circuit_breakers"]["thresholds"][0]["max_requests"] == 2500
    assert "overload_manager" not in boot  # a sidecar's descriptors are its container's: no limit assumed


@pytest.mark.parametrize("value", ["0", "-3", "many", str(1 << 32)])
def test_max_ext_proc_streams_must_be_a_number_of_streams(value, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["envoy-config", "--max-ext-proc-streams", value])
    assert exit_.value.code == 2
    assert "--max-ext-proc-streams" in capsys.readouterr().err
