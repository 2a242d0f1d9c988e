"""Loading LLMProvider/LLMRoute objects from files and directories of YAML."""

from __future__ import annotations

import pytest

from extproc.config.file_source import load_config
from extproc.config.loader import key_env_allowed, load_paths, parse_object
from extproc.config.problems import ConfigError
from support.manifests import API, DASHSCOPE_KEY, SEED, SEED_ENV, provider, route, rule, write

SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "svc"}, "spec": {"ports": [{"port": 80}]}}
DEPLOYMENT = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "dep"},
              "spec": {"replicas": 1, "template": {"spec": {"containers": [{"name": "c", "image": "x"}]}}}}
P1 = provider("p1", "p1.example.com")
P2 = provider("p2", "p2.example.com", namespace="team")
R1 = route("r1", "r1.example.com", [rule("p1.example.com")])


def keys(loaded) -> list[tuple[str, str, str]]:
    return [obj.key for obj in loaded]


@pytest.mark.parametrize(("docs", "expected"), [
    pytest.param([SERVICE, P1, DEPLOYMENT, R1], [("LLMProvider", "default", "p1"), ("LLMRoute", "default", "r1")],
                 id="service-and-deployment-skipped"),
    pytest.param([SERVICE, DEPLOYMENT], [], id="only-other-kinds"),
    pytest.param([{"apiVersion": "v1", "kind": "List", "items": [P1, SERVICE, R1]}],
                 [("LLMProvider", "default", "p1"), ("LLMRoute", "default", "r1")], id="list-unpacked"),
    pytest.param([{"apiVersion": "v1", "kind": "List", "items": [P1]}, P2],
                 [("LLMProvider", "default", "p1"), ("LLMProvider", "team", "p2")], id="list-then-plain-document"),
    pytest.param([None, P1, None], [("LLMProvider", "default", "p1")], id="empty-documents-ignored"),
    pytest.param([P1], [("LLMProvider", "default", "p1")], id="namespace-defaults-to-default"),
    pytest.param([P2], [("LLMProvider", "team", "p2")], id="explicit-namespace-kept"),
    pytest.param([P1, provider("p1", "other.example.com", namespace="team")],
                 [("LLMProvider", "default", "p1"), ("LLMProvider", "team", "p1")],
                 id="same-name-other-namespace-both-kept"),
    pytest.param([P1, route("p1", "r.example.com", [rule("p1.example.com")])],
                 [("LLMProvider", "default", "p1"), ("LLMRoute", "default", "p1")],
                 id="same-name-other-kind-both-kept"),
])
def test_objects_loaded_from_multi_document_file(tmp_path, docs, expected):
    loaded, problems = load_paths([write(tmp_path / "all.yaml", *docs)], {})
    # Kubernetes' own kinds are skipped with a note (for `extproc validate`), no warning, no error
    assert [p for p in problems if p.severity != "note"] == []
    assert len([p for p in problems if p.severity == "note"]) == sum(
        str(d).count("'Service'") + str(d).count("'Deployment'") for d in docs)
    assert keys(loaded) == expected


@pytest.mark.parametrize(("docs", "expected_host"), [
    pytest.param([provider("p", "first.example.com"), provider("p", "second.example.com")], "second.example.com",
                 id="same-file-later-wins"),
    pytest.param([provider("p", "first.example.com"), provider("p", "second.example.com", namespace="default")],
                 "second.example.com", id="implicit-and-explicit-default-namespace-are-the-same-object"),
])
def test_later_document_with_same_key_wins(tmp_path, docs, expected_host):
    loaded, problems = load_paths([write(tmp_path / "all.yaml", *docs)], {})
    assert problems == []
    assert len(loaded) == 1
    assert loaded[0].resource.spec.host == expected_host


@pytest.mark.parametrize(("files", "has_vip_config"), [
    pytest.param(["01-LLMProvider.yaml", "03-LLMProvider-with-route-config.yaml"], True, id="seed-01-then-03"),
    pytest.param(["03-LLMProvider-with-route-config.yaml", "01-LLMProvider.yaml"], False, id="seed-03-then-01"),
])
def test_seed_provider_reapplied_later_wins(files, has_vip_config):
    loaded, problems = load_paths([SEED / f for f in files], SEED_ENV)
    assert problems == []
    assert keys(loaded) == [("LLMProvider", "default", "dashscope-qwen")]
    specific = loaded[0].resource.spec.configs.route_specific_configs
    assert ("vip-route" in specific) is has_vip_config
    assert loaded[0].file.endswith(files[-1])


def test_seed_directory_loads_every_llm_object_once():
    loaded, problems = load_paths([SEED], SEED_ENV)
    # the seed's Service, ServiceAccount, Service and Deployment: skipped, noted
    assert sorted((p.severity, p.obj.split(" (")[1].split(" ")[0]) for p in problems) == [
        ("note", "Deployment"), ("note", "Service"), ("note", "Service"), ("note", "ServiceAccount")]
    assert sorted(keys(loaded)) == [
        ("LLMProvider", "default", "dashscope-qwen"),
        ("LLMProvider", "default", "moonshot"),
        ("LLMRoute", "default", "dashscope-route"),
        ("LLMRoute", "default", "demo-llm-server"),
    ]
    dashscope = next(o for o in loaded if o.key[2] == "dashscope-qwen")
    assert dashscope.file.endswith("03-LLMProvider-with-route-config.yaml")  # 03 sorts after 01


@pytest.mark.parametrize(("layout", "expected_hosts"), [
    pytest.param({"b.yaml": "b.example.com", "a.yaml": "a.example.com"}, ["b.example.com"],
                 id="sorted-by-name-later-wins"),
    pytest.param({"a.yml": "yml.example.com"}, ["yml.example.com"], id="yml-suffix"),
    pytest.param({"a.json": "json.example.com"}, ["json.example.com"], id="json-suffix"),
    pytest.param({"a.yaml": "a.example.com", "notes.txt": "txt.example.com", "z.yaml.bak": "bak.example.com"},
                 ["a.example.com"], id="other-suffixes-ignored"),
    pytest.param({"a.yaml": "a.example.com", "sub/z.yaml": "sub.example.com"}, ["a.example.com"], id="not-recursive"),
])
def test_directory_loading(tmp_path, layout, expected_hosts):
    for rel, host in layout.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path, provider("p", host))  # same name everywhere: the last file loaded wins
    loaded, problems = load_paths([tmp_path], {})
    assert problems == []
    assert [o.resource.spec.host for o in loaded] == expected_hosts


@pytest.mark.parametrize(("api_key", "environ", "expected"), [
    pytest.param("${KEY}", {"KEY": "sk-123"}, "sk-123", id="whole-value"),
    pytest.param("pre-${KEY}-post", {"KEY": "mid"}, "pre-mid-post", id="inside-text"),
    pytest.param("${A}${B}", {"A": "one", "B": "two"}, "onetwo", id="two-variables"),
    pytest.param("$KEY", {"KEY": "sk-123"}, "$KEY", id="without-braces-not-expanded"),
    pytest.param("sk-literal", {}, "sk-literal", id="literal-kept"),
    pytest.param("${KEY}", {"KEY": "${OTHER}", "OTHER": "no"}, "${OTHER}", id="value-not-expanded-again"),
])
def test_api_key_expansion(tmp_path, api_key, environ, expected):
    doc = provider("p", "p.example.com", api_key=api_key, route_configs={"vip": {"model": "x", "apiKey": api_key}})
    loaded, problems = load_paths([write(tmp_path / "p.yaml", doc)], environ)
    assert problems == []
    configs = loaded[0].resource.spec.configs
    assert configs.default_config.openai_config.api_key == expected
    assert configs.route_specific_configs["vip"].openai_config.api_key == expected


def test_seed_api_keys_expanded_from_environ():
    loaded, problems = load_paths([SEED / "03-LLMProvider-with-route-config.yaml"], SEED_ENV)
    assert problems == []
    configs = loaded[0].resource.spec.configs
    assert configs.default_config.openai_config.api_key == DASHSCOPE_KEY
    assert configs.route_specific_configs["vip-route"].openai_config.api_key == DASHSCOPE_KEY


@pytest.mark.parametrize(("doc", "label", "field"), [
    pytest.param(provider("dash", "d.example.com", api_key="${MISSING_KEY}"), "LLMProvider default/dash",
                 "spec.configs.defaultConfig.openAIConfig.apiKey", id="default-config"),
    pytest.param(provider("dash", "d.example.com", api_key="sk-ok",
                          route_configs={"vip": {"apiKey": "${MISSING_KEY}"}}),
                 "LLMProvider default/dash", "spec.configs.routeSpecificConfigs.vip.openAIConfig.apiKey",
                 id="route-specific-config"),
    pytest.param(provider("dash", "d.example.com", api_key="${MISSING_KEY}", namespace="team"), "LLMProvider team/dash",
                 "spec.configs.defaultConfig.openAIConfig.apiKey", id="other-namespace"),
])
def test_unset_variable_is_an_error_naming_file_object_and_field(tmp_path, doc, label, field):
    file = write(tmp_path / "keys.yaml", doc)
    loaded, problems = load_paths([file], {"OTHER": "x"})
    assert loaded == []
    assert len(problems) == 1
    problem = problems[0]
    assert problem.severity == "error"
    assert (problem.file, problem.obj, problem.field) == (str(file), label, field)
    text = str(problem)
    for part in (str(file), label, field, "MISSING_KEY"):
        assert part in text
    with pytest.raises(ConfigError) as info:
        load_config([file], {})
    assert field in str(info.value) and label in str(info.value)


def test_seed_without_environment_reports_each_unset_key():
    loaded, problems = load_paths([SEED], {})
    problems = [p for p in problems if p.severity == "error"]
    fields = sorted((p.obj, p.field) for p in problems)
    assert fields == [
        ("LLMProvider default/dashscope-qwen", "spec.configs.defaultConfig.openAIConfig.apiKey"),  # 01
        ("LLMProvider default/dashscope-qwen", "spec.configs.defaultConfig.openAIConfig.apiKey"),  # 03
        ("LLMProvider default/dashscope-qwen", "spec.configs.routeSpecificConfigs.vip-route.openAIConfig.apiKey"),
        ("LLMProvider default/moonshot", "spec.configs.defaultConfig.openAIConfig.apiKey"),
    ]
    assert all("is not set" in p.message for p in problems)


@pytest.mark.parametrize(("text", "line"), [
    pytest.param("kind: LLMProvider\nmetadata: {name: x\nspec: {}\n", 3, id="unclosed-flow-mapping"),
    pytest.param("kind: LLMProvider\nmetadata:\n  name: x\n bad: indent\n", 4, id="bad-indentation"),
    pytest.param("a: 1\n---\nb: [\n", 4, id="second-document"),
    pytest.param("key: \"unterminated\n", 2, id="unterminated-string"),
])
def test_invalid_yaml_names_file_and_line(tmp_path, text, line):
    file = tmp_path / "broken.yaml"
    file.write_text(text)
    loaded, problems = load_paths([file], {})
    assert loaded == []
    assert len(problems) == 1
    assert problems[0].file.startswith(f"{file}:{line}:")
    assert "invalid YAML" in str(problems[0])


def test_invalid_yaml_in_one_file_does_not_hide_other_files(tmp_path):
    write(tmp_path / "a.yaml", P1)
    (tmp_path / "b.yaml").write_text("x: [\n")
    loaded, problems = load_paths([tmp_path], {})
    assert keys(loaded) == [("LLMProvider", "default", "p1")]
    assert len(problems) == 1 and "b.yaml" in problems[0].file


@pytest.mark.parametrize("api_version", [
    pytest.param("istio.alibabacloud.com/v1alpha1", id="older-version"),
    pytest.param("networking.istio.io/v1beta1", id="other-group"),
    pytest.param(None, id="missing"),
])
def test_wrong_api_version(tmp_path, api_version):
    doc = provider("p", "p.example.com")
    if api_version is None:
        del doc["apiVersion"]
    else:
        doc["apiVersion"] = api_version
    loaded, problems = load_paths([write(tmp_path / "p.yaml", doc)], {})
    assert loaded == []
    assert len(problems) == 1
    assert "unsupported apiVersion" in problems[0].message and API in problems[0].message
    assert (problems[0].obj, problems[0].field) == ("LLMProvider default/p", "apiVersion")


@pytest.mark.parametrize(("text", "number"), [
    pytest.param("just a string\n", 1, id="scalar"),
    pytest.param("- 1\n- 2\n", 1, id="sequence"),
    pytest.param("kind: Service\n---\nfoo\n", 2, id="after-other-kind"),
    pytest.param("kind: List\nitems: [{kind: Service}, {kind: Service}]\n---\nfoo\n", 2, id="after-a-list"),
    pytest.param("kind: Service\n---\n---\nfoo\n", 3, id="after-an-empty-document"),
])
def test_document_that_is_not_a_mapping(tmp_path, text, number):
    """The problem names the document's position in the file (the n-th YAML document)."""
    file = tmp_path / "p.yaml"
    file.write_text(text)
    loaded, problems = load_paths([file], {})
    assert loaded == []
    assert [p.message for p in problems if p.severity != "note"] == [f"document {number} is not a mapping"]


@pytest.mark.parametrize("make_paths", [
    pytest.param(lambda d: [d / "nope.yaml"], id="missing-file"),
    pytest.param(lambda d: [d / "nope"], id="missing-directory"),
    pytest.param(lambda d: [write(d / "ok.yaml", P1), d / "nope.yaml"], id="missing-among-existing"),
])
def test_missing_path_is_a_problem(tmp_path, make_paths):
    paths = make_paths(tmp_path)
    missing = str(paths[-1])
    loaded, problems = load_paths(paths, {})
    assert loaded == []
    assert len(problems) == 1
    assert missing in str(problems[0]) and "no such file or directory" in str(problems[0])
    with pytest.raises(ConfigError) as info:
        load_config(paths, {})
    assert "no such file or directory" in str(info.value)


@pytest.mark.parametrize("name, host, key_env, allowed", [
    ("K", "a.example", None, True),  # files: anything
    ("K", "a.example", {}, False),  # Kubernetes, nothing bound
    ("K", "a.example", {"K": "a.example"}, True),
    ("K", "evil.example", {"K": "a.example"}, False),
    ("OTHER", "a.example", {"K": "a.example"}, False),
    ("K", "A.Example", {"K": "a.example"}, True),
])
def test_key_env_allowed(name, host, key_env, allowed):
    assert key_env_allowed(name, host, key_env) is allowed


def test_unbound_key_variable_is_refused_with_its_reason():
    doc = provider("p", "evil.example", namespace="tenant", api_key="${YOUR_DASHSCOPE_API_KEY}")
    env = {"YOUR_DASHSCOPE_API_KEY": "sk-secret"}
    obj, problems = parse_object(doc, "k8s", "1", env, key_env={"YOUR_DASHSCOPE_API_KEY": "dashscope.aliyuncs.com"})
    assert obj is None
    (problem,) = problems
    assert problem.reason == "KeyEnvNotAllowed" and problem.field == "spec.configs.defaultConfig.openAIConfig.apiKey"
    assert "sk-secret" not in str(problem)
    ok, problems = parse_object(provider("p", "dashscope.aliyuncs.com", api_key="${YOUR_DASHSCOPE_API_KEY}"),
                                "k8s", "1", env, key_env={"YOUR_DASHSCOPE_API_KEY": "dashscope.aliyuncs.com"})
    assert not problems and ok.resource.spec.configs.default_config.openai_config.api_key == "sk-secret"
