"""The `extproc` command's subcommands that read a config and print: `validate` and `route`."""

from __future__ import annotations

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


def test_route_takes_the_callers_labels_and_namespace_and_says_why(tmp_path, capsys):
    from support.manifests import route, rule

    payments = {**rule(DASHSCOPE, name="payments"), "matches": [{"sourceLabels": {"app": "payments"}}]}
    file = write(tmp_path / "c.yaml", provider("dashscope", DASHSCOPE, route_configs={"payments": {"model": "max"}}),
                 route("dash", DASHSCOPE, [payments, rule(DASHSCOPE)]),
                 route("svc", "svc", [rule(DASHSCOPE)], namespace="a"),
                 route("svc", "svc", [rule(DASHSCOPE)], namespace="b"))
    assert main(["route", "--config", str(file), "--host", DASHSCOPE, "--source-labels", "app=payments,tier=gold"]) == 0
    out = capsys.readouterr().out
    assert "rule: payments\nwhy: matches[0]: sourceLabels app=payments" in out and "model max" in out
    assert main(["route", "--config", str(file), "--host", DASHSCOPE]) == 0
    assert "rule: rules[1]\nwhy: it has no matches: every request" in capsys.readouterr().out
    assert main(["route", "--config", str(file), "--host", "svc", "--source-namespace", "b"]) == 0
    assert "route: b/svc" in capsys.readouterr().out
    assert main(["route", "--config", str(file), "--host", "svc"]) == 1
    assert "several namespaces (a, b)" in capsys.readouterr().out


def test_bad_source_labels_are_refused_on_the_command_line(tmp_path, capsys):
    import pytest

    for bad in ("app", "bad key=x"):
        with pytest.raises(SystemExit) as exited:
            main(["route", "--config", str(tmp_path), "--host", "h", "--source-labels", bad])
        assert exited.value.code == 2
    assert "label key 'bad key'" in capsys.readouterr().err
