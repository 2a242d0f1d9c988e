"""LLMProviders of other APIs (our extension fields beside openAIConfig): exactly one API config,
what each API needs (Anthropic's version and default max_tokens, Gemini's API version, Bedrock's
region and key pair, Azure's deployment and api-version), credentials from `${VAR}` and Secrets,
route-specific configs of the same API, and the compiled targets; bad config named by file,
object and field, credentials never in a repr."""

from __future__ import annotations

import pytest
import yaml

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.policy.table import ApiSettings

ENV = {"ANTHROPIC_KEY": "sk-ant-1", "AWS_ID": "AKIA1", "AWS_SECRET": "s3cr3t", "AZ_KEY": "az-1", "G_KEY": "g-1"}


def provider(name: str, host: str, config: dict, **spec) -> dict:
    return {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMProvider", "metadata": {"name": name},
            "spec": {"host": host, "configs": {"defaultConfig": config}, **spec}}


def load(*docs: dict, secrets=None):
    text = yaml.safe_dump_all(docs)
    if secrets is None:
        return load_text(text, "f.yaml", ENV)
    from extproc.config.loader import parse_object

    objs, problems = [], []
    for i, doc in enumerate(docs):
        obj, found = parse_object(doc, "cluster", str(i), ENV, secrets)
        problems += found
        if obj is not None:
            objs.append(obj)
    return objs, problems


def errors(problems):
    return [(p.field, p.message) for p in problems if p.severity == "error"]


CLAUDE = provider("claude", "api.anthropic.com", {"anthropicConfig": {
    "model": "claude-sonnet-4-5", "apiKey": "${ANTHROPIC_KEY}", "version": "2023-06-01", "maxTokens": 2048}})
GEMINI = provider("gemini", "generativelanguage.googleapis.com", {"geminiConfig": {
    "model": "gemini-2.5-flash", "apiKey": "${G_KEY}", "apiVersion": "v1"}})
BEDROCK = provider("bedrock", "bedrock-runtime.eu-west-1.amazonaws.com", {"bedrockConfig": {
    "model": "anthropic.claude-3-5-haiku-20241022-v1:0", "region": "eu-west-1", "accessKeyId": "${AWS_ID}",
    "secretAccessKey": "${AWS_SECRET}"}})
AZURE = provider("azure", "res.openai.azure.com", {"azureOpenAIConfig": {
    "deployment": "gpt4o-prod", "apiKey": "${AZ_KEY}", "embeddingDeployment": "embed"}})


def test_each_api_compiles_into_its_target():
    objs, problems = load(CLAUDE, GEMINI, BEDROCK, AZURE)
    assert not errors(problems)
    table = compile_config(objs).table
    targets = {host: table.routes[host].rules[0].targets[0] for host in
               ("api.anthropic.com", "generativelanguage.googleapis.com", "bedrock-runtime.eu-west-1.amazonaws.com",
                "res.openai.azure.com")}
    claude = targets["api.anthropic.com"]
    assert (claude.api, claude.body_api, claude.model, claude.api_key) == ("anthropic", "anthropic",
                                                                          "claude-sonnet-4-5", "sk-ant-1")
    assert claude.api_settings == ApiSettings(anthropic_version="2023-06-01", max_tokens=2048)
    gemini = targets["generativelanguage.googleapis.com"]
    assert (gemini.api, gemini.api_settings.api_version) == ("gemini", "v1")
    bedrock = targets["bedrock-runtime.eu-west-1.amazonaws.com"]
    assert bedrock.api_settings.region == "eu-west-1" and bedrock.api_settings.access_key_id == "AKIA1"
    assert bedrock.api_settings.secret_access_key == "s3cr3t" and bedrock.api_key is None
    azure = targets["res.openai.azure.com"]
    assert (azure.api, azure.body_api, azure.model) == ("azure", "openai", "gpt4o-prod")  # the deployment's name
    assert azure.api_settings == ApiSettings(api_version="2024-10-21", deployment="gpt4o-prod",
                                             embedding_deployment="embed")
    for target in targets.values():  # no credential in what a log or an error would print
        assert not any(secret in repr(target) for secret in ENV.values())
    assert not any(secret in repr(objs) for secret in ENV.values())


def test_the_defaults_of_each_api():
    objs, _ = load(provider("c", "c.example", {"anthropicConfig": {"model": "m", "apiKey": "k"}}),
                   provider("g", "g.example", {"geminiConfig": {"model": "m", "apiKey": "k"}}))
    table = compile_config(objs).table
    assert table.routes["c.example"].rules[0].targets[0].api_settings == ApiSettings()  # 2023-06-01, 4096
    assert table.routes["g.example"].rules[0].targets[0].api_settings.api_version == "v1beta"


@pytest.mark.parametrize(("config", "field", "words"), [
    ({}, "spec.configs.defaultConfig", "set exactly one of openAIConfig, azureOpenAIConfig"),
    ({"openAIConfig": {"model": "m"}, "anthropicConfig": {"model": "m"}}, "spec.configs.defaultConfig",
     "got openAIConfig, anthropicConfig"),
    ({"anthropicConfig": {"model": "m", "maxTokens": 0}}, "spec.configs.defaultConfig.anthropicConfig.maxTokens",
     "greater than or equal to 1"),
    ({"anthropicConfig": {"model": "m", "temperature": 1}}, "spec.configs.defaultConfig.anthropicConfig.temperature",
     "unknown field"),
    ({"bedrockConfig": {"model": "m", "region": "moon", "accessKeyId": "a", "secretAccessKey": "s"}},
     "spec.configs.defaultConfig.bedrockConfig.region", "should match pattern"),
    ({"bedrockConfig": {"model": "m", "region": "us-east-1", "secretAccessKey": "s", "accessKeyId": "a",
                        "accessKeyIdSecretRef": {"name": "n", "key": "k"}}},
     "spec.configs.defaultConfig.bedrockConfig", "set accessKeyId or accessKeyIdSecretRef, not both"),
    ({"azureOpenAIConfig": {"deployment": "d", "apiVersion": "latest"}},
     "spec.configs.defaultConfig.azureOpenAIConfig.apiVersion", "should match pattern"),
])
def test_bad_configs_are_named_by_field(config, field, words):
    _, problems = load(provider("p", "p.example", config))
    assert any(f == field and words in message for f, message in errors(problems)), errors(problems)


@pytest.mark.parametrize(("config", "field"), [
    ({"anthropicConfig": {"apiKey": "k"}}, "spec.configs.defaultConfig.anthropicConfig.model"),
    ({"azureOpenAIConfig": {"apiKey": "k"}}, "spec.configs.defaultConfig.azureOpenAIConfig.deployment"),
    ({"bedrockConfig": {"model": "m", "accessKeyId": "a", "secretAccessKey": "s"}},
     "spec.configs.defaultConfig.bedrockConfig.region"),
    ({"bedrockConfig": {"model": "m", "region": "us-east-1", "accessKeyId": "a"}},
     "spec.configs.defaultConfig.bedrockConfig.secretAccessKey"),
])
def test_what_each_api_needs_is_required(config, field):
    objs, problems = load(provider("p", "p.example", config))
    compiled = compile_config(objs)
    assert (field, "required field is missing") in errors(compiled.problems)
    assert compiled.table.route_for("p.example") is None


def test_a_route_specific_config_speaks_the_default_configs_api_and_overrides_its_fields():
    specific = {**CLAUDE, "spec": {**CLAUDE["spec"], "configs": {
        **CLAUDE["spec"]["configs"],
        "routeSpecificConfigs": {"fast": {"anthropicConfig": {"model": "claude-haiku-4-5"}},
                                 "odd": {"openAIConfig": {"model": "gpt-4o"}}}}}}
    objs, problems = load(specific)
    compiled = compile_config(objs)
    assert ("spec.configs.routeSpecificConfigs.odd.openAIConfig",
            "a route-specific config overrides fields of the default config: use anthropicConfig here too "
            "(got openAIConfig)") in errors(compiled.problems)
    fast = {"fast": {"anthropicConfig": {"model": "claude-haiku-4-5"}}}
    without_odd = {**specific, "spec": {**specific["spec"], "configs": {
        **specific["spec"]["configs"], "routeSpecificConfigs": fast}}}
    rules = [{"name": "fast", "backendRefs": [{"providerHost": "api.anthropic.com"}]}]
    route = {"apiVersion": "istio.alibabacloud.com/v1beta1", "kind": "LLMRoute", "metadata": {"name": "r"},
             "spec": {"host": "chat", "rules": rules}}
    objs, _ = load(without_odd, route)
    target = compile_config(objs).table.routes["chat"].rules[0].targets[0]
    assert (target.model, target.api_key, target.api_settings.max_tokens) == ("claude-haiku-4-5", "sk-ant-1", 2048)


def test_bedrock_credentials_from_secrets():
    stored = {("default", "aws", "id"): "AKIA-S", ("default", "aws", "secret"): "from-secret"}
    config = {"bedrockConfig": {"model": "m", "region": "us-east-1",
                                "accessKeyIdSecretRef": {"name": "aws", "key": "id"},
                                "secretAccessKeySecretRef": {"name": "aws", "key": "secret"},
                                "sessionTokenSecretRef": {"name": "aws", "key": "token"}}}
    objs, problems = load(provider("b", "b.example", config), secrets=lambda ns, name, key: stored.get((ns, name, key)))
    assert errors(problems) == [("spec.configs.defaultConfig.bedrockConfig.sessionTokenSecretRef",
                                 "Secret default/aws has no key 'token' (or does not exist)")]
    stored[("default", "aws", "token")] = "tok"
    objs, problems = load(provider("b", "b.example", config), secrets=lambda ns, name, key: stored.get((ns, name, key)))
    settings = compile_config(objs).table.routes["b.example"].rules[0].targets[0].api_settings
    assert (settings.access_key_id, settings.secret_access_key, settings.session_token) == ("AKIA-S", "from-secret",
                                                                                            "tok")


def test_an_unset_variable_names_the_credentials_field():
    config = {"bedrockConfig": {"model": "m", "region": "us-east-1", "accessKeyId": "${NOPE}",
                                "secretAccessKey": "s"}}
    _, problems = load(provider("b", "b.example", config))
    assert errors(problems) == [("spec.configs.defaultConfig.bedrockConfig.accessKeyId",
                                 "environment variable NOPE is not set")]
