"""LLMDataPolicy from files: validation naming file, object and field (RE2's refusals included),
which routes and callers a policy applies to, which rules check answers, the warnings of what does less
than it may seem,
and a policy with an error never replacing the one in force."""

from __future__ import annotations

import asyncio

import pytest

from extproc.config.compile import compile_config
from extproc.config.file_source import FileSource, load_config
from extproc.config.loader import load_text
from extproc.config.problems import ConfigError
from extproc.policy.data_protection.policy import Action

PROVIDERS = """apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: dashscope, namespace: NS}
spec:
  host: dashscope.aliyuncs.com
  configs: {defaultConfig: {openAIConfig: {model: qwen-max, apiKey: sk-inline}}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: moonshot, namespace: NS}
spec:
  host: api.moonshot.cn
  configs: {defaultConfig: {openAIConfig: {model: moonshot-v1-8k, apiKey: sk-inline}}}
"""
POLICY = """---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMDataPolicy
metadata: {name: NAME, namespace: NS}
spec:
SPEC"""
ISSUE_EXAMPLE = """  hosts: [dashscope.aliyuncs.com, demo-llm-server]
  rules:
  - name: ids-and-cards
    detectors: [{builtin: china-resident-id}, {builtin: bank-card}, {builtin: email}]
    action: mask
  - name: credentials
    detectors: [{builtin: secret}, {regex: 'ACME-[0-9]{6}', name: acme-ticket}]
    action: block
"""


def policy(spec: str, name: str = "no-secrets-out", namespace: str = "default") -> str:
    return POLICY.replace("NAME", name).replace("NS", namespace).replace("SPEC", spec)


def load(text: str, namespaces: bool = False, home: str | None = None):
    objects, problems = load_text(text, "policies.yaml")
    compiled = compile_config(objects, namespaces=namespaces, home=home) if not problems else None
    return objects, problems, compiled


def test_the_issue_example_is_accepted_with_a_warning_for_the_host_nobody_serves():
    _, problems, compiled = load(PROVIDERS.replace("NS", "default") + policy(ISSUE_EXAMPLE))
    assert problems == []
    assert [(p.severity, p.field, p.reason) for p in compiled.problems] == [
        ("warning", "spec.hosts[1]", "HostNotFound")]
    guard = compiled.table.protection.guard("default/dashscope", None)
    assert [(r.name, r.action, r.detectors) for r in guard.rules] == [
        ("ids-and-cards", Action.MASK, ("china-resident-id", "bank-card", "email")),
        ("credentials", Action.BLOCK, ("secret", "acme-ticket"))]
    assert compiled.table.protection.guard("default/moonshot", None) is None  # not in its hosts
    assert any(obj.resource.kind == "LLMDataPolicy" for obj in compiled.accepted)


@pytest.mark.parametrize(("spec", "field", "message"), [
    ("  rules:\n  - detectors: [{regex: '(?=secret)x'}]\n    action: block\n",
     "spec.rules[0].detectors[0].regex", "RE2 cannot run this pattern (invalid perl operator: (?=)"),
    ("  rules:\n  - detectors: [{regex: '(a)\\1'}]\n    action: block\n",
     "spec.rules[0].detectors[0].regex", "RE2 cannot run this pattern (invalid escape sequence"),
    ("  rules:\n  - detectors: [{regex: 'x*'}]\n    action: block\n",
     "spec.rules[0].detectors[0].regex", "the pattern matches the empty text"),
    ("  rules:\n  - detectors: [{builtin: passport}]\n    action: block\n",
     "spec.rules[0].detectors[0].builtin", "Input should be 'email', 'phone'"),
    ("  rules:\n  - detectors: [{builtin: email, regex: a}]\n    action: block\n",
     "spec.rules[0].detectors[0]", "set exactly one of builtin, regex, keywords, judge (got builtin, regex)"),
    ("  rules:\n  - detectors: [{name: x}]\n    action: block\n",
     "spec.rules[0].detectors[0]", "set exactly one of builtin, regex, keywords, judge"),
    ("  rules:\n  - detectors: [{builtin: email, name: mail}]\n    action: block\n",
     "spec.rules[0].detectors[0]", "name is for regex and keywords detectors"),
    ("  rules:\n  - detectors: [{keywords: []}]\n    action: block\n",
     "spec.rules[0].detectors[0].keywords", "at least 1 item"),
    ("  rules:\n  - detectors: [{builtin: email}]\n    action: delete\n",
     "spec.rules[0].action", "Input should be 'block', 'mask' or 'log'"),
    ("  rules:\n  - detectors: [{judge: {host: private-llm}}]\n    action: mask\n",
     "spec.rules[0]", "a judge finds no text to mask"),
    ("  rules:\n  - detectors: [{judge: {host: private-llm, timeout: 0s}}]\n    action: block\n",
     "spec.rules[0].detectors[0].judge.timeout", "timeout must be more than zero"),
    ("  rules:\n  - {name: a, detectors: [{builtin: email}], action: log}\n"
     "  - {name: a, detectors: [{builtin: ipv4}], action: log}\n", "spec", "rule names must be unique"),
    ("  hosts: ['http://x']\n  rules:\n  - detectors: [{builtin: email}]\n    action: log\n",
     "spec.hosts", "is not a host name"),
    ("  rules: []\n", "spec.rules", "at least 1 item"),
    ("  rules:\n  - detectors: [{builtin: email}]\n    action: log\n    extra: 1\n",
     "spec.rules[0].extra", "unknown field"),
])
def test_invalid_policies_name_file_object_and_field(spec, field, message):
    _, problems, _ = load(policy(spec))
    assert problems, "refused"
    problem = problems[0]
    assert (problem.file, problem.obj, problem.field) == ("policies.yaml", "LLMDataPolicy default/no-secrets-out",
                                                          field)
    assert message in problem.message, problem.message


def test_what_does_less_than_it_seems_is_a_warning_naming_the_field():
    """Answers are checked by patterns: a policy of judges only checks none; a judge whose host no
    route serves cannot be asked. Both accepted, with a warning naming the field."""
    spec = """  responses: {check: true}
  rules:
  - name: judged
    detectors: [{judge: {host: private-llm.internal, failOpen: true}}]
    action: block
"""
    _, problems, compiled = load(PROVIDERS.replace("NS", "default") + policy(spec))
    assert problems == []
    warnings = {(p.field, p.reason): p.message for p in compiled.problems}
    assert set(warnings) == {("spec.responses.check", "NothingToCheck"),
                             ("spec.rules[0].detectors[0].judge.host", "HostNotFound")}
    assert "its answers are not checked" in warnings[("spec.responses.check", "NothingToCheck")]
    assert "failOpen decides" in warnings[("spec.rules[0].detectors[0].judge.host", "HostNotFound")]
    assert all(p.severity == "warning" for p in compiled.problems)
    guard = compiled.table.protection.guard("default/dashscope", None)
    assert guard is not None and guard.answers is None  # nothing checks the answers


def test_answers_are_checked_by_the_rules_of_the_policies_that_say_so():
    """`responses.check` is per policy: the answer guard holds the pattern rules of the policies
    that check answers, none of the others'."""
    checked = policy("""  responses: {check: true}
  rules:
  - {name: cards, detectors: [{builtin: bank-card}], action: mask}
  - {name: judged, detectors: [{judge: {host: dashscope.aliyuncs.com}}], action: block}
""")
    unchecked = policy("  rules:\n  - {name: keys, detectors: [{builtin: secret}], action: block}\n",
                       name="prompts-only")
    _, problems, compiled = load(PROVIDERS.replace("NS", "default") + checked + unchecked)
    assert problems == []
    guard = compiled.table.protection.guard("default/dashscope", None)
    assert guard is not None and [r.name for r in guard.rules] == ["cards", "judged", "keys"]
    assert guard.answers is not None and [r.name for r in guard.answers.rules] == ["cards"]
    assert guard.answers.answers is guard.answers  # its own answer guard: itself
    _, _, alone = load(PROVIDERS.replace("NS", "default") + checked.replace(
        "  - {name: judged, detectors: [{judge: {host: dashscope.aliyuncs.com}}], action: block}\n", ""))
    only = alone.table.protection.guard("default/dashscope", None)
    assert only is not None and only.answers is only  # every rule checks answers: the same guard


def test_scope_files_apply_to_everyone_kubernetes_to_the_policys_namespace():
    text = (PROVIDERS.replace("NS", "llm-gateway")
            + policy("  rules:\n  - {name: mesh, detectors: [{builtin: secret}], action: block}\n",
                     "mesh-wide", "llm-gateway")
            + policy("  rules:\n  - {name: team, detectors: [{builtin: email}], action: mask}\n", "team-a", "team-a")
            + policy("  hosts: [api.moonshot.cn]\n  rules:\n"
                     "  - {name: moon, detectors: [{builtin: ipv4}], action: log}\n", "moon", "team-b"))
    # files: every policy applies to every caller
    _, _, files = load(text)
    protection = files.table.protection
    assert [r.name for r in protection.guard("llm-gateway/dashscope", "team-b").rules] == ["mesh", "team"]
    # Kubernetes: the control plane's namespace for everyone, others for their own workloads
    _, _, kube = load(text, namespaces=True, home="llm-gateway")
    protection = kube.table.protection
    assert [r.name for r in protection.guard("llm-gateway/dashscope", "team-a").rules] == ["mesh", "team"]
    assert [r.name for r in protection.guard("llm-gateway/dashscope", "team-b").rules] == ["mesh"]
    assert [r.name for r in protection.guard("llm-gateway/dashscope", "elsewhere").rules] == ["mesh"]
    assert [r.name for r in protection.guard("llm-gateway/moonshot", "team-b").rules] == ["mesh", "moon"]
    # the gateway's own Envoy (local mode) gets every policy of the route
    assert [r.name for r in protection.guard("llm-gateway/moonshot", None).rules] == ["mesh", "team", "moon"]
    # routes with the same set of policies share one guard (compiled once)
    assert protection.guard("llm-gateway/dashscope", "x") is protection.guard("llm-gateway/moonshot", "x")
    assert protection.guard("llm-gateway/dashscope", "team-b") is protection.guard("llm-gateway/moonshot", "x")


def test_without_a_policy_the_table_has_no_guards():
    _, _, compiled = load(PROVIDERS.replace("NS", "default"))
    assert compiled.table.protection.by_route == {}


def test_a_policy_with_an_error_never_replaces_the_one_in_force(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(PROVIDERS.replace("NS", "default") + policy(ISSUE_EXAMPLE))
    applied = []

    async def apply(compiled):
        applied.append(compiled)

    source = FileSource([config], apply, interval=0.01)
    asyncio.run(source.load_initial())
    config.write_text(PROVIDERS.replace("NS", "default") + policy(ISSUE_EXAMPLE.replace("ACME-[0-9]{6}", "(?=x)")))
    assert asyncio.run(source.check()) is False
    assert len(applied) == 1
    with pytest.raises(ConfigError) as refused:
        load_config([config])
    assert "spec.rules[1].detectors[1].regex" in str(refused.value)
    guard = applied[0].table.protection.guard("default/dashscope", None)
    assert [p.detector for p in guard.rules[1].patterns][-1] == "acme-ticket"


def test_a_table_with_policies_reaches_worker_processes_pickled():
    """`serve --workers N` hands each worker the routing table pickled: the guards go with it."""
    import pickle

    _, _, compiled = load(PROVIDERS.replace("NS", "default") + policy(ISSUE_EXAMPLE))
    table = pickle.loads(pickle.dumps(compiled.table))
    guard = table.protection.guard("default/dashscope", None)
    text = b"card 4111 1111 1111 1111, AKIAIOSFODNN7EXAMPLE, ACME-123456"
    verdict = guard.inspect([text])
    assert (verdict.action, verdict.rule.name, verdict.detector) == (Action.BLOCK, "credentials", "secret")
    assert guard.masked_texts([text], verdict) == [b"card [BANK-CARD], AKIAIOSFODNN7EXAMPLE, ACME-123456"]
