"""Config validation through load_config/compile_config: what is rejected, and where it is reported."""

from __future__ import annotations

import logging

import pytest

from extproc.config.compile import compile_config
from extproc.config.file_source import load_config
from extproc.config.loader import load_paths, load_text
from extproc.config.problems import ConfigError
from support.budget_docs import budget_doc
from support.failover_config import CONFIG, compiled
from support.manifests import DASHSCOPE, load_docs, provider, route, rule, write

BACKEND = "backend.example.com"
PB = provider("backend", BACKEND)


def match(**headers) -> dict:
    return {"headers": headers}


# (docs, message substring, field path, object label)
BAD_CONFIGS = [
    pytest.param([provider("p1", "a.example.com"), provider("p2", "a.example.com")],
                 "host 'a.example.com' is already served by LLMProvider default/p1", "spec.host",
                 "LLMProvider default/p2", id="duplicated-provider-host"),
    pytest.param([provider("p1", "a.example.com", namespace="x"), provider("p2", "A.Example.COM", namespace="y")],
                 "host 'a.example.com' is already served by LLMProvider x/p1", "spec.host", "LLMProvider y/p2",
                 id="duplicated-provider-host-case-and-namespace"),
    pytest.param([PB, route("r1", "chat.example.com", [rule(BACKEND)]),
                  route("r2", "chat.example.com", [rule(BACKEND)])],
                 "host 'chat.example.com' is already routed by LLMRoute default/r1", "spec.host", "LLMRoute default/r2",
                 id="duplicated-route-host"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND), rule("nope.example.com")])],
                 "no LLMProvider serves host 'nope.example.com'", "spec.rules[1].backendRefs[0].providerHost",
                 "LLMRoute default/r", id="provider-host-not-served"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND, "nope.example.com", weights=[1, 1])])],
                 "no LLMProvider serves host 'nope.example.com'", "spec.rules[0].backendRefs[1].providerHost",
                 "LLMRoute default/r", id="provider-host-not-served-second-ref"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND, BACKEND, weights=[5, -1])])],
                 "greater than or equal to 0", "spec.rules[0].backendRefs[1].weight", "LLMRoute default/r",
                 id="negative-weight"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND, BACKEND, weights=[0, 0])])],
                 "weights of a rule add up to zero", "spec.rules[0]", "LLMRoute default/r", id="weights-all-zero"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND, weights=[0])])],
                 "weights of a rule add up to zero", "spec.rules[0]", "LLMRoute default/r", id="single-weight-zero"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND), rule(BACKEND, BACKEND, weights=[3, None])])],
                 "set weight on every backendRef of a rule, or on none", "spec.rules[1]", "LLMRoute default/r",
                 id="weight-on-some-backend-refs-only"),
    pytest.param([PB, route("r", "chat.example.com",
                            [rule(BACKEND, matches=[match(**{"x-user": {"regex": "(vip"}})])])],
                 "invalid regex '(vip'", "spec.rules[0].matches[0].headers.x-user", "LLMRoute default/r",
                 id="invalid-regex"),
    pytest.param([PB, route("r", "chat.example.com",
                            [rule(BACKEND, matches=[match(x={"exact": "a", "prefix": "b"})])])],
                 "set only one of exact, prefix, regex (got exact, prefix)", "spec.rules[0].matches[0].headers.x",
                 "LLMRoute default/r", id="exact-and-prefix"),
    pytest.param([PB, route("r", "chat.example.com",
                            [rule(BACKEND, matches=[match(), match(x={"prefix": "a", "regex": "b.*"})])])],
                 "(got prefix, regex)", "spec.rules[0].matches[1].headers.x", "LLMRoute default/r",
                 id="prefix-and-regex"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND, matches=[match(x={"exact": "a", "regex": "b"})])])],
                 "(got exact, regex)", "spec.rules[0].matches[0].headers.x", "LLMRoute default/r",
                 id="exact-and-regex"),
    pytest.param([provider("p", "a.example.com", pathh="/v1/chat/completions")],
                 "unknown field", "spec.pathh", "LLMProvider default/p", id="unknown-field-under-spec"),
    pytest.param([{**provider("p", "a.example.com"),
                   "spec": {"host": "a.example.com", "configs": {"defaultConfig": {"openAIConfig": {"modle": "m"}}}}}],
                 "unknown field", "spec.configs.defaultConfig.openAIConfig.modle", "LLMProvider default/p",
                 id="unknown-nested-field"),
    pytest.param([PB, route("r", "chat.example.com", [{**rule(BACKEND), "match": []}])],
                 "unknown field", "spec.rules[0].match", "LLMRoute default/r", id="unknown-field-in-rule"),
    pytest.param([provider("p", "a.example.com", model=None, api_key="sk")],
                 "required field is missing", "spec.configs.defaultConfig.openAIConfig.model", "LLMProvider default/p",
                 id="default-config-without-model"),
    pytest.param([provider("p", "https://a.example.com")],
                 "is not a host name", "spec.host", "LLMProvider default/p", id="provider-host-with-scheme"),
    pytest.param([PB, route("r", "chat.example.com:8080", [rule(BACKEND)])],
                 "is not a host name", "spec.host", "LLMRoute default/r", id="route-host-with-port"),
    pytest.param([provider("p", "a.example.com", path="v1/chat")],
                 "should match pattern", "spec.path", "LLMProvider default/p", id="path-not-absolute"),
    pytest.param([PB, route("r", "chat.example.com", [])],
                 "at least 1 item", "spec.rules", "LLMRoute default/r", id="no-rules"),
    pytest.param([PB, route("r", "chat.example.com", [rule(BACKEND, name="a"), rule(BACKEND, name="a")])],
                 "rule names must be unique (repeated: a)", "spec", "LLMRoute default/r", id="repeated-rule-name"),
    pytest.param([PB, route("r", "chat.example.com", [rule()])],
                 "at least 1 item", "spec.rules[0].backendRefs", "LLMRoute default/r", id="no-backend-refs"),
    pytest.param([{"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMProvider", "metadata": {"name": "p"}}],
                 "required field is missing", "spec", "LLMProvider default/p", id="missing-spec"),
]


@pytest.mark.parametrize(("docs", "message", "field", "label"), BAD_CONFIGS)
def test_bad_config_is_rejected_with_location(tmp_path, docs, message, field, label):
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, *docs)
    problems = info.value.problems
    assert len(problems) == 1, [str(p) for p in problems]
    problem = problems[0]
    assert message in problem.message
    assert problem.field == field
    assert problem.obj == label
    assert problem.file == str(tmp_path / "config.yaml")
    assert problem.severity == "error"
    assert message in str(info.value) and field in str(info.value) and label in str(info.value)


def test_bad_object_left_out_by_compile_config_while_others_compile(tmp_path):
    """compile_config (used without all-or-nothing) keeps the good objects of a set with a bad one."""
    file = write(tmp_path / "c.yaml", provider("p1", "a.example.com"), provider("p2", "a.example.com"),
                 provider("p3", "b.example.com"))
    objects, problems = load_paths([file], {})
    assert problems == []
    compiled = compile_config(objects)
    assert [p.obj for p in compiled.problems] == ["LLMProvider default/p2"]
    assert sorted(o.label for o in compiled.accepted) == ["LLMProvider default/p1", "LLMProvider default/p3"]
    assert compiled.table.route_for("a.example.com").rules[0].targets[0].provider == "default/p1"


@pytest.mark.parametrize("doc", [
    pytest.param(provider("p", "a.example.com", workloadSelector={"labels": {"app": "x"}}),
                 id="provider-workloadSelector"),
    pytest.param(provider("p", "a.example.com", gateways=["mesh"]), id="provider-gateways"),
    pytest.param(route("r", "chat.example.com", [rule("a.example.com")], workloadSelector={"labels": {"app": "x"}}),
                 id="route-workloadSelector"),
    pytest.param(route("r", "chat.example.com",
                       [rule("a.example.com", matches=[match(), {"sourceLabels": {"app": "x"}}])]),
                 id="match-sourceLabels"),
    pytest.param(route("r", "chat.example.com", [rule("a.example.com", matches=[{"gateways": ["mesh"]}])]),
                 id="match-gateways"),
])
def test_asm_workload_fields_are_served_without_a_warning(tmp_path, caplog, doc):
    """Every field of ASM's two kinds is implemented: none is accepted with a 'not implemented' warning."""
    docs = [doc] if doc["kind"] == "LLMProvider" else [provider("p", "a.example.com"), doc]
    with caplog.at_level(logging.WARNING, logger="extproc.config"):
        compiled = load_docs(tmp_path, *docs)  # no ConfigError
    assert [p for p in compiled.problems if p.severity == "warning"] == []
    assert not [r for r in caplog.records if "not implemented" in r.getMessage()]
    assert doc["spec"]["host"] in compiled.table.host_names  # the object is in force


def test_warnings_do_not_make_a_config_error(tmp_path):
    # a match naming a gateway its route is not bound to never applies: a warning; a duplicate host: an error
    never = route("r", "chat.example.com", [rule("a.example.com", matches=[{"gateways": ["ns/gw"]}])])
    bad = provider("p2", "a.example.com")
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, provider("p1", "a.example.com"), never, bad)
    assert [p.severity for p in info.value.problems] == ["error"]
    assert "gateways" not in str(info.value)
    compiled = load_docs(tmp_path, provider("p1", "a.example.com"), never)
    (warning,) = compiled.problems
    assert warning.severity == "warning" and warning.field == "spec.rules[0].matches[0].gateways[0]"
    assert "ns/gw never applies" in warning.message


@pytest.mark.parametrize(("docs", "fields"), [
    pytest.param([provider("p1", "a.example.com", pathh="/x"),
                  route("r", "chat.example.com", [rule("a.example.com", weights=[-1])])],
                 {("LLMProvider default/p1", "spec.pathh"),
                  ("LLMRoute default/r", "spec.rules[0].backendRefs[0].weight")},
                 id="two-objects-with-schema-errors"),
    pytest.param([provider("p1", "a.example.com", path="x", pathh="/x")],
                 {("LLMProvider default/p1", "spec.path"), ("LLMProvider default/p1", "spec.pathh")},
                 id="two-errors-in-one-object"),
    pytest.param([provider("p1", "a.example.com"), provider("p2", "a.example.com"),
                  route("r", "chat.example.com", [rule("nope.example.com")])],
                 {("LLMProvider default/p2", "spec.host"),
                  ("LLMRoute default/r", "spec.rules[0].backendRefs[0].providerHost")},
                 id="two-cross-object-errors"),
    pytest.param([provider("p1", "a.example.com", api_key="${UNSET_A}"),
                  provider("p2", "b.example.com", api_key="${UNSET_B}")],
                 {("LLMProvider default/p1", "spec.configs.defaultConfig.openAIConfig.apiKey"),
                  ("LLMProvider default/p2", "spec.configs.defaultConfig.openAIConfig.apiKey")},
                 id="two-unset-variables"),
])
def test_all_problems_reported_together(tmp_path, docs, fields):
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, *docs)
    problems = info.value.problems
    assert {(p.obj, p.field) for p in problems} == fields
    assert len(problems) == len(fields)
    assert len(str(info.value).splitlines()) == len(fields)


def test_problems_in_two_files_reported_together(tmp_path):
    write(tmp_path / "a.yaml", provider("p1", "a.example.com", pathh="/x"))
    (tmp_path / "b.yaml").write_text("kind: [\n")
    with pytest.raises(ConfigError) as info:
        load_config([tmp_path], {})
    files = sorted(p.file.split(":")[0] for p in info.value.problems)
    assert files == [str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")]


@pytest.mark.parametrize("host", ["10.0.0.1", "1.2.3.4", "example.com:443", "https://example.com"])
def test_provider_host_must_be_a_name(tmp_path, host):
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, provider("p", host))
    (problem,) = info.value.problems
    assert problem.field == "spec.host" and "is not a host name" in problem.message


def test_empty_environment_variable_for_api_key_is_an_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, provider("p", "a.example.com", api_key="${EMPTY_KEY}"), environ={"EMPTY_KEY": ""})
    (problem,) = info.value.problems
    assert problem.field == "spec.configs.defaultConfig.openAIConfig.apiKey"
    assert problem.message == "environment variable EMPTY_KEY is empty"


@pytest.mark.parametrize("change, field, message", [
    ("attempts: 1", "attempts: -1", "greater than or equal to 0"),
    ("perTryTimeout: 20s", "perTryTimeout: soon", "should match pattern"),
    ("retryOn: [5xx, 429]", "retryOn: [5xx, teapot]", "unknown retryOn value 'teapot'"),
    ("retryOn: [5xx, 429]", "retryOn: [5xx, 200]", "unknown retryOn value '200'"),
])
def test_bad_retries_name_the_field(change, field, message):
    loaded, problems = load_text(CONFIG.replace(change, field), "f.yaml")
    text = "\n".join(str(p) for p in problems)
    assert "f.yaml" in text and "LLMRoute default/r" in text and "spec.rules[0].retries" in text, text
    assert message in text, text


def test_fallback_no_provider_serves_names_the_field():
    c = compiled(CONFIG.replace("fallbackRefs: [{providerHost: b.example.com}]",
                                "fallbackRefs: [{providerHost: z.example.com}]"))
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert problem.field == "spec.rules[0].fallbackRefs[0].providerHost" and "z.example.com" in problem.message


@pytest.mark.parametrize(("doc", "message", "field"), [
    pytest.param(budget_doc([{"tokens": 0, "per": "1h"}]), "greater than or equal to 1", "spec.rules[0].tokens",
                 id="zero-tokens"),
    pytest.param(budget_doc([{"tokens": 10, "per": "31d"}]), "between 1s and 30d", "spec.rules[0].per",
                 id="per-too-long"),
    pytest.param(budget_doc([{"tokens": 10, "per": "500ms"}]), "between 1s and 30d", "spec.rules[0].per",
                 id="per-too-short"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1 hour"}]), "should match pattern", "spec.rules[0].per",
                 id="per-not-a-duration"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h", "requests": 0}]), "greater than or equal to 1",
                 "spec.rules[0].requests", id="zero-requests"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h", "tokenz": 3}]), "unknown field", "spec.rules[0].tokenz",
                 id="typo"),
    pytest.param(budget_doc([]), "at least 1 item", "spec.rules", id="no-rules"),
    pytest.param(budget_doc([{"name": "a", "tokens": 1, "per": "1h"}, {"name": "a", "tokens": 1, "per": "1h"}]),
                 "rule names must be unique", "spec", id="duplicate-rule-names"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h"}], key="bad header"), "should match pattern",
                 "spec.key.header", id="bad-key-header"),
    pytest.param(budget_doc([{"tokens": 10, "per": "1h"}], host="nowhere.example.com"),
                 "no LLMRoute or LLMProvider serves host 'nowhere.example.com'", "spec.host", id="unknown-host"),
    pytest.param({**budget_doc([{"tokens": 10, "per": "1h"}]), "apiVersion": "istio.alibabacloud.com/v1beta1"},
                 "expected 'llm-gateway.dev/v1alpha1'", "apiVersion", id="wrong-group"),
])
def test_bad_budget_names_file_object_field(tmp_path, doc, message, field):
    with pytest.raises(ConfigError) as error:
        load_docs(tmp_path, provider("dashscope", DASHSCOPE), doc)
    text = "\n".join(str(p) for p in error.value.problems)
    assert message in text and f": {field}: " in text and "LLMTokenRateLimit default/per-user" in text
    assert "config.yaml" in text
