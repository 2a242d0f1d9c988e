"""The CustomResourceDefinitions, generated from the same models the loader validates with.

Pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined,
optional fields as plain types, no `additionalProperties: false` (Kubernetes prunes unknown
fields instead), and only the checks both Kubernetes 1.20 and current clusters enforce: types,
required, minimum, minLength, minItems, maxProperties, pattern, enum.
"""

from __future__ import annotations

import copy
from typing import Any

from pydantic import BaseModel

from .models import (
    BUDGET_API_VERSION,
    LLMDataPolicySpec,
    LLMPriceTableSpec,
    LLMProviderSpec,
    LLMRouteSpec,
    LLMTokenRateLimitSpec,
)

GROUP = "istio.alibabacloud.com"
VERSION = "v1beta1"
BUDGET_GROUP, BUDGET_VERSION = BUDGET_API_VERSION.split("/")  # our own kind, in our own group
_KEEP = ("type", "description", "minimum", "maximum", "minLength", "maxLength", "minItems", "maxProperties", "pattern",
         "enum", "x-kubernetes-validations")


def _structural(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    if "$ref" in schema:
        return _structural(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    if "anyOf" in schema:  # Optional[X]: X (absence is how Kubernetes says "not set")
        options = [s for s in schema["anyOf"] if s.get("type") != "null"]
        if len(options) != 1:
            raise ValueError(f"cannot express {schema} as a structural schema")
        merged = {**_structural(options[0], defs)}
        if "description" in schema:
            merged["description"] = schema["description"]
        return merged
    out = {k: copy.deepcopy(schema[k]) for k in _KEEP if k in schema}  # no shared lists: YAML would alias them
    if schema.get("type") == "object":
        if "properties" in schema:
            out["properties"] = {name: _structural(sub, defs) for name, sub in schema["properties"].items()}
            if schema.get("required"):
                out["required"] = list(schema["required"])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            out["additionalProperties"] = _structural(extra, defs)
        elif "properties" not in schema:  # a free-form map (workloadSelector)
            out["x-kubernetes-preserve-unknown-fields"] = True
    if schema.get("type") == "array":
        out["items"] = _structural(schema.get("items", {}), defs)
    return out


def spec_schema(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    return _structural(schema, schema.get("$defs", {}))


_CONDITIONS = {
    "type": "object",
    "properties": {
        "conditions": {
            "type": "array",
            "description": "Accepted: whether the gateway serves this object, and if not, why.",
            "items": {
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "observedGeneration": {"type": "integer"},
                    "lastTransitionTime": {"type": "string"},
                },
            },
        },
    },
}

_ACCEPTED = {"name": "Accepted", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Accepted")].status'}
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}


def _crd(kind: str, plural: str, spec: dict[str, Any], columns: list[dict[str, str]], short: str,
         group: str = GROUP, version: str = VERSION) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{group}"},
        "spec": {
            "group": group,
            "names": {"kind": kind, "listKind": f"{kind}List", "plural": plural, "singular": kind.lower(),
                      "shortNames": [short]},
            "scope": "Namespaced",
            "versions": [{
                "name": version,
                "served": True,
                "storage": True,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [*columns, _ACCEPTED, _AGE],
                "schema": {"openAPIV3Schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "apiVersion": {"type": "string"},
                        "kind": {"type": "string"},
                        "metadata": {"type": "object"},
                        "spec": spec,
                        "status": _CONDITIONS,
                    },
                }},
            }],
        },
    }


def crd_documents() -> list[dict[str, Any]]:
    provider = _crd("LLMProvider", "llmproviders", spec_schema(LLMProviderSpec), [
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        {"name": "Model", "type": "string", "jsonPath": ".spec.configs.defaultConfig.openAIConfig.model"},
    ], "llmp")
    route = _crd("LLMRoute", "llmroutes", spec_schema(LLMRouteSpec), [
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        {"name": "Rules", "type": "string", "jsonPath": ".spec.rules[*].name"},
    ], "llmr")
    budget = _crd("LLMTokenRateLimit", "llmtokenratelimits", spec_schema(LLMTokenRateLimitSpec), [
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        {"name": "Key", "type": "string", "jsonPath": ".spec.key.header"},
        {"name": "Rules", "type": "string", "jsonPath": ".spec.rules[*].name"},
    ], "llmtrl", BUDGET_GROUP, BUDGET_VERSION)
    prices = _crd("LLMPriceTable", "llmpricetables", spec_schema(LLMPriceTableSpec), [
        {"name": "Host", "type": "string", "jsonPath": ".spec.host"},
        {"name": "Currency", "type": "string", "jsonPath": ".spec.currency"},
        {"name": "Models", "type": "string", "jsonPath": ".spec.models[*].model"},
    ], "llmprice", BUDGET_GROUP, BUDGET_VERSION)
    data_policy = _crd("LLMDataPolicy", "llmdatapolicies", spec_schema(LLMDataPolicySpec), [
        {"name": "Hosts", "type": "string", "jsonPath": ".spec.hosts"},
        {"name": "Rules", "type": "string", "jsonPath": ".spec.rules[*].name"},
        {"name": "Actions", "type": "string", "jsonPath": ".spec.rules[*].action"},
    ], "llmdp", BUDGET_GROUP, BUDGET_VERSION)
    return [provider, route, budget, prices, data_policy]


def crds_yaml() -> str:
    import yaml

    header = "# Generated by `extproc crds` from extproc/config/models.py: do not edit by hand.\n"
    return header + yaml.safe_dump_all(crd_documents(), sort_keys=False, width=120)
