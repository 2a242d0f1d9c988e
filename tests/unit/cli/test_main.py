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


def test_dns_resolver_takes_an_ip_address():
    import argparse

    import pytest

    from extproc.cli.argtypes import ip_port
    from extproc.envoy.addresses import HostPort

    assert ip_port("127.0.0.1:5353") == HostPort("127.0.0.1", 5353)
    assert ip_port("[::1]:53") == HostPort("::1", 53)
    with pytest.raises(argparse.ArgumentTypeError, match="an IP address, not a name"):
        ip_port("dns.example.com:53")
