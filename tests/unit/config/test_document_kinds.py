"""What a config directory's documents are read as: ours, Kubernetes' and Istio's own (skipped,
noted), a kind not read from files (a warning), or unknown (an error naming file and document,
with a "did you mean"); an empty directory said so; and errors of single objects and across
objects reported in one round, without the ones an unparsed object explains."""

from __future__ import annotations

import pytest

from extproc.cli.main import main
from extproc.config.file_source import load_config
from extproc.config.loader import classify, load_paths
from extproc.config.problems import ConfigError
from support.budget_docs import budget_doc
from support.manifests import API, provider, route, rule, write

BUDGET_API = "llm-gateway.dev/v1alpha1"


@pytest.mark.parametrize(("kind", "api_version", "verdict", "says"), [
    pytest.param("LLMRoute", API, "ours", None, id="ours"),
    pytest.param("LLMTokenRateLimit", BUDGET_API, "ours", None, id="ours-budget"),
    pytest.param("LLMRoute", "networking.istio.io/v1", "ours", None, id="ours-wrong-version-is-the-parsers"),
    pytest.param("LLMRoutes", API, "error", "did you mean LLMRoute", id="plural"),
    pytest.param("LLMProvidr", API, "error", "did you mean LLMProvider", id="letter-missing"),
    pytest.param("llmroute", API, "error", "did you mean LLMRoute", id="case"),
    pytest.param("LLMTokenRateLimits", BUDGET_API, "error", "did you mean LLMTokenRateLimit", id="plural-budget"),
    pytest.param("LLMRoutes", "v1", "error", "did you mean LLMRoute", id="typo-in-another-group"),
    pytest.param("ASMRateLimiter", API, "error", "unknown kind 'ASMRateLimiter' in istio.alibabacloud.com/v1beta1",
                 id="our-group-other-kind"),
    pytest.param("Certificate", "cert-manager.io/v1", "error", "keep other manifests out", id="another-group"),
    pytest.param("Service", None, "skip", None, id="no-api-version-core"),
    pytest.param(None, API, "error", "no kind", id="no-kind"),
    pytest.param("Secret", "v1", "warn", "read only with --kubernetes", id="secret-not-from-files"),
    pytest.param("Service", "v1", "skip", None, id="service"),
    pytest.param("Deployment", "apps/v1", "skip", None, id="deployment"),
    pytest.param("HTTPRoute", "gateway.networking.k8s.io/v1", "skip", None, id="gateway-api"),
    pytest.param("VirtualService", "networking.istio.io/v1beta1", "skip", None, id="istio"),
])
def test_classify(kind, api_version, verdict, says):
    found, why = classify(kind, api_version)
    assert found == verdict
    if says is None:
        assert why is None
    else:
        assert says in why


def test_a_typo_is_an_error_naming_file_and_document(tmp_path):
    docs = [provider("p", "p.example.com"), {**route("r", "r", [rule("p.example.com")]), "kind": "LLMRoutes"}]
    file = write(tmp_path / "c.yaml", *docs)
    with pytest.raises(ConfigError) as failed:
        load_config([file], {})
    (problem,) = failed.value.problems
    assert str(problem) == (f"{file}: document 2 (LLMRoutes default/r): kind: unknown kind 'LLMRoutes': "
                            f"did you mean LLMRoute ({API})?")


def test_an_empty_directory_says_so(tmp_path, caplog):
    empty = tmp_path / "conf"
    empty.mkdir()
    (empty / "README.md").write_text("not config")
    compiled = load_config([empty], {})
    (warning,) = [p for p in compiled.problems if p.severity == "warning"]
    assert warning.file == str(empty) and "no config files (*.yaml, *.yml, *.json) in this directory" in str(warning)
    assert "no config files" in caplog.text


def test_only_other_manifests_say_nothing_would_be_served(tmp_path):
    file = write(tmp_path / "c.yaml", {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}})
    problems = load_config([file], {}).problems
    assert [(p.severity, p.reason) for p in problems] == [("note", "Skipped"), ("warning", "Empty")]


def test_schema_and_cross_object_errors_in_one_round(tmp_path):
    """A provider with a typo'd field, a route naming it and another naming no provider, a budget
    on the first route's host: the typo and the dangling host are reported together; the route's
    and the budget's troubles the broken provider explains are not reported twice."""
    broken = provider("broken", "broken.example.com")
    broken["spec"]["bogus"] = 1
    docs = [broken, provider("ok", "ok.example.com"),
            route("uses-broken", "chat", [rule("broken.example.com")]),
            route("dangling", "other", [rule("nowhere.example.com")]),
            budget_doc([{"name": "all", "tokens": 10, "per": "1m"}], host="chat")]
    file = write(tmp_path / "c.yaml", *docs)
    with pytest.raises(ConfigError) as failed:
        load_config([file], {})
    found = sorted((p.obj, p.field, p.message) for p in failed.value.problems)
    assert found == [
        ("LLMProvider default/broken", "spec.bogus", "unknown field (check its spelling)"),
        ("LLMRoute default/dangling", "spec.rules[0].backendRefs[0].providerHost",
         "no LLMProvider serves host 'nowhere.example.com'"),
    ]


def test_validate_summarises_what_it_skipped(tmp_path, capsys):
    file = write(tmp_path / "c.yaml", provider("p", "p.example.com"),
                 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"}},
                 {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}},
                 {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "t"}})
    assert main(["validate", str(file)]) == 0
    out = capsys.readouterr()
    assert out.out.strip() == ("ok: 1 LLMProvider, 0 LLMRoute; skipped 3 Kubernetes/Istio objects "
                               "(2 Service, 1 Deployment)")
    assert out.err == ""  # notes are no warnings


def test_validate_of_an_unknown_kind_fails(tmp_path, capsys):
    file = write(tmp_path / "c.yaml", {**provider("p", "p.example.com"), "kind": "LLMProvidr"})
    assert main(["validate", str(file)]) == 1
    assert "did you mean LLMProvider" in capsys.readouterr().err


def test_secret_in_files_is_a_warning_not_an_error(tmp_path):
    file = write(tmp_path / "c.yaml", provider("p", "p.example.com"),
                 {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "keys"}, "stringData": {"k": "v"}})
    loaded, problems = load_paths([file], {})
    assert len(loaded) == 1
    (warning,) = problems
    assert warning.severity == "warning" and "apiKey: ${VARIABLE}" in warning.message
    assert "stringData" not in str(warning) and "'v'" not in str(warning)  # never a secret's value
