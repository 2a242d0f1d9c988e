"""The CRDs: generated from the loader's models, committed, and holding the apply-time checks."""

from __future__ import annotations

import yaml

from extproc.config.crds import crd_documents, crds_yaml
from support.helpers import REPO


def test_committed_crds_match_the_generator():
    assert (REPO / "k8s" / "crds.yaml").read_text() == crds_yaml(), "regenerate: python -m extproc crds > k8s/crds.yaml"


def _spec(kind: str) -> dict:
    (crd,) = [d for d in crd_documents() if d["spec"]["names"]["kind"] == kind]
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1beta1" and version["subresources"] == {"status": {}}
    return version["schema"]["openAPIV3Schema"]["properties"]["spec"]


def test_route_schema_checks_weights_match_kinds_and_required_fields():
    spec = _spec("LLMRoute")
    assert spec["required"] == ["host", "rules"]
    rule = spec["properties"]["rules"]["items"]
    assert spec["properties"]["rules"]["minItems"] == 1
    assert rule["required"] == ["backendRefs"]
    ref = rule["properties"]["backendRefs"]["items"]
    assert ref["properties"]["weight"] == {"type": "integer", "minimum": 0}
    assert "required" not in ref  # providerHost or backendRef: exactly one, said in CEL
    assert ref["x-kubernetes-validations"] == [{"rule": "has(self.providerHost) != has(self.backendRef)",
                                                "message": "set providerHost or backendRef, not both"}]
    assert ref["properties"]["backendRef"]["properties"]["kind"]["enum"] == ["Service", "InferencePool"]
    match = rule["properties"]["matches"]["items"]["properties"]["headers"]["additionalProperties"]
    assert match["maxProperties"] == 1
    assert set(match["properties"]) == {"exact", "prefix", "regex"}
    assert spec["properties"]["host"]["pattern"].startswith("^[A-Za-z0-9]")


def test_provider_schema_has_secret_ref_and_no_pydantic_leftovers():
    spec = _spec("LLMProvider")
    openai = spec["properties"]["configs"]["properties"]["defaultConfig"]["properties"]["openAIConfig"]
    assert openai["properties"]["apiKeySecretRef"]["required"] == ["name", "key"]
    text = yaml.safe_dump(crd_documents())
    for leftover in ("$ref", "anyOf", "additionalProperties: false", "title:", "'null'", "default:"):
        assert leftover not in text, leftover


def test_printer_columns():
    columns = {d["spec"]["names"]["kind"]: [c["name"] for c in d["spec"]["versions"][0]["additionalPrinterColumns"]]
               for d in crd_documents()}
    assert columns == {"LLMProvider": ["Host", "Model", "Accepted", "Age"],
                       "LLMRoute": ["Host", "Rules", "Accepted", "Age"],
                       "LLMTokenRateLimit": ["Host", "Key", "Rules", "Accepted", "Age"],
                       "LLMPriceTable": ["Host", "Currency", "Models", "Accepted", "Age"],
                       "LLMDataPolicy": ["Hosts", "Rules", "Actions", "Accepted", "Age"]}


def test_budget_crd_is_in_our_own_group_with_its_checks():
    (crd,) = [d for d in crd_documents() if d["spec"]["names"]["kind"] == "LLMTokenRateLimit"]
    assert crd["spec"]["group"] == "llm-gateway.dev" and crd["metadata"]["name"] == "llmtokenratelimits.llm-gateway.dev"
    (version,) = crd["spec"]["versions"]
    assert version["name"] == "v1alpha1"
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["host", "rules"]
    rule = spec["properties"]["rules"]["items"]
    assert rule["required"] == ["per"]  # tokens, cost or both: the model says which is missing (Accepted)
    assert rule["properties"]["tokens"]["minimum"] == 1 and rule["properties"]["requests"]["minimum"] == 1
    assert rule["properties"]["cost"]["pattern"] == r"^[0-9]{1,9}(\.[0-9]{1,6})?$"
    assert rule["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"
    assert rule["properties"]["per"]["pattern"] == "^[0-9]+(ms|s|m|h|d)$"


def test_crds_carry_the_new_fields():
    text = (REPO / "k8s" / "crds.yaml").read_text()
    for name in ("fallbackRefs", "retries", "perTryTimeout", "retryOn", "outlierDetection", "consecutiveErrors",
                 "baseEjectionTime"):
        assert f"{name}:" in text, name


def test_price_table_crd_is_in_our_own_group_with_its_checks():
    (crd,) = [d for d in crd_documents() if d["spec"]["names"]["kind"] == "LLMPriceTable"]
    assert crd["spec"]["group"] == "llm-gateway.dev" and crd["metadata"]["name"] == "llmpricetables.llm-gateway.dev"
    (version,) = crd["spec"]["versions"]
    spec = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    assert spec["required"] == ["host", "currency", "models"]
    assert spec["properties"]["currency"]["pattern"] == "^[A-Z]{3}$"
    price = spec["properties"]["models"]["items"]
    assert price["required"] == ["model", "input", "output"]
    for name in ("input", "output", "cachedInput"):  # decimals as text, at most six of them
        assert price["properties"][name] == {**price["properties"][name], "type": "string",
                                             "pattern": "^[0-9]{1,9}(\\.[0-9]{1,6})?$"}
