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


DATA_POLICY = {"apiVersion": "llm-gateway.dev/v1alpha1", "kind": "LLMDataPolicy",
               "metadata": {"name": "no-secrets-out", "namespace": "llm"},
               "spec": {"rules": [
                   {"name": "cards", "detectors": [{"builtin": "bank-card"}, {"builtin": "email"}], "action": "mask"},
                   {"name": "credentials", "detectors": [{"builtin": "secret"}], "action": "block"},
                   {"name": "judged", "detectors": [{"judge": {"host": DASHSCOPE, "failOpen": True}}],
                    "action": "log"}]}}


def test_route_body_tells_which_rules_a_body_meets_never_what_they_found(tmp_path, capsys):
    import json

    file = write(tmp_path / "c.yaml", provider("dashscope", DASHSCOPE, namespace="llm"), DATA_POLICY)
    assert main(["validate", str(file)]) == 0
    assert "1 LLMDataPolicy" in capsys.readouterr().out
    body = tmp_path / "body.json"

    def route(content) -> tuple[int, str]:
        body.write_text(json.dumps(content))
        code = main(["route", "--config", str(file), "--host", DASHSCOPE, "--body", str(body)])
        return code, capsys.readouterr().out

    code, out = route({"messages": [{"role": "user", "content": "card 4111 1111 1111 1111 mail a@b.io"},
                                    {"role": "user", "content": [{"type": "text", "text": "c@d.io"}]}]})
    assert code == 0
    assert ("llm/no-secrets-out rule cards (mask): bank-card x1 in messages[0].content; email x2 in "
            "messages[0].content, messages[1].content[0].text") in out
    assert "llm/no-secrets-out rule credentials (block): nothing found" in out
    assert f"judge {DASHSCOPE}: asked per request (timeout 3s, failOpen true); not asked by a dry run" in out
    assert "verdict: mask (rule cards of llm/no-secrets-out)" in out
    assert "4111" not in out and "a@b.io" not in out

    code, out = route({"model": "m", "input": ["key sk-0123456789abcdef0123456789abcdef"]})
    assert code == 0 and "data policies (embeddings, 1 prompt strings)" in out
    assert "verdict: block: the request gets 400 content_policy_violation" in out and "sk-0123" not in out

    code, out = route({"model": "m", "prompt": "hello"})
    assert code == 0 and "verdict: nothing found: forwarded as it is" in out

    body.write_text("{not json")
    assert main(["route", "--config", str(file), "--host", DASHSCOPE, "--body", str(body)]) == 2
    assert "is not JSON" in capsys.readouterr().err
    body.write_text(json.dumps({"nothing": 1}))
    assert main(["route", "--config", str(file), "--host", DASHSCOPE, "--body", str(body)]) == 2
    assert "none of messages (chat), prompt (completions), input (embeddings)" in capsys.readouterr().err


def test_route_body_without_a_policy(tmp_path, capsys):
    file = write(tmp_path / "c.yaml", provider("dashscope", DASHSCOPE, namespace="llm"))
    body = tmp_path / "body.json"
    body.write_text('{"messages": [{"role": "user", "content": "hi"}]}')
    assert main(["route", "--config", str(file), "--host", DASHSCOPE, "--body", str(body)]) == 0
    assert "data policies: none applies to this route" in capsys.readouterr().out
def test_dns_resolver_takes_an_ip_address():
    import argparse

    import pytest

    from extproc.cli.argtypes import ip_port
    from extproc.envoy.addresses import HostPort

    assert ip_port("127.0.0.1:5353") == HostPort("127.0.0.1", 5353)
    assert ip_port("[::1]:53") == HostPort("::1", 53)
    with pytest.raises(argparse.ArgumentTypeError, match="an IP address, not a name"):
        ip_port("dns.example.com:53")
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
