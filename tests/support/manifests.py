"""Builders shared by the unit tests: manifests as dicts, written as YAML into a tmp dir, and loaded or
compiled as `extproc up` (files) or the Kubernetes source (namespaces) would."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

import extproc
from extproc.config.compile import Compiled, compile_config
from extproc.config.file_source import load_config
from extproc.config.loader import parse_object

API = "istio.alibabacloud.com/v1beta1"
SEED = Path(extproc.__file__).parent / "demo" / "manifests"
DASHSCOPE_KEY = "sk-unit-dashscope"
MOONSHOT_KEY = "sk-unit-moonshot"
SEED_ENV = {"YOUR_DASHSCOPE_API_KEY": DASHSCOPE_KEY, "YOUR_MOONSHOT_API_KEY": MOONSHOT_KEY}
DASHSCOPE = "dashscope.aliyuncs.com"
MOONSHOT = "api.moonshot.cn"
HOME = "llm-gateway"  # the control plane's namespace, where the Kubernetes tests' shared objects live


def provider(name: str, host: str, model: str | None = "m-default", *, namespace: str | None = None,
             api_key: str | None = None, stream: bool | None = None, path: str | None = None,
             route_configs: dict[str, dict] | None = None, **spec_extra: Any) -> dict:
    openai: dict[str, Any] = {}
    if model is not None:
        openai["model"] = model
    if api_key is not None:
        openai["apiKey"] = api_key
    if stream is not None:
        openai["stream"] = stream
    configs: dict[str, Any] = {"defaultConfig": {"openAIConfig": openai}}
    if route_configs:
        configs["routeSpecificConfigs"] = {rule: {"openAIConfig": cfg} for rule, cfg in route_configs.items()}
    spec: dict[str, Any] = {"host": host, "configs": configs, **spec_extra}
    if path is not None:
        spec["path"] = path
    return {"apiVersion": API, "kind": "LLMProvider", "metadata": _meta(name, namespace), "spec": spec}


def route(name: str, host: str, rules: list[dict], *, namespace: str | None = None, **spec_extra: Any) -> dict:
    return {"apiVersion": API, "kind": "LLMRoute", "metadata": _meta(name, namespace),
            "spec": {"host": host, "rules": rules, **spec_extra}}


def rule(*hosts: str, name: str | None = None, weights: list[int] | None = None,
         matches: list[dict] | None = None) -> dict:
    refs = [{"providerHost": h} for h in hosts]
    if weights is not None:
        for ref, w in zip(refs, weights, strict=False):
            if w is not None:
                ref["weight"] = w
    out: dict[str, Any] = {"backendRefs": refs}
    if name is not None:
        out["name"] = name
    if matches is not None:
        out["matches"] = matches
    return out


def _meta(name: str, namespace: str | None) -> dict:
    meta = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return meta


def write(path: Path, *docs: Any) -> Path:
    path.write_text(yaml.safe_dump_all(list(docs), sort_keys=False), encoding="utf-8")
    return path


def load_docs(tmp_path: Path, *docs: Any, environ: dict[str, str] | None = None) -> Compiled:
    """Write the documents into one file and load it the way `extproc up -f` does."""
    file = write(tmp_path / "config.yaml", *docs)
    return load_config([file], environ if environ is not None else {})


def load_seed(*names: str, environ: dict[str, str] | None = None) -> Compiled:
    return load_config([SEED / n for n in names], SEED_ENV if environ is None else environ)


def compile_in_namespaces(*docs: Any, namespaces: bool = True) -> Compiled:
    """Compile the documents as the Kubernetes source does: each route and provider visible to the
    namespaces it is exported to (the control plane's namespace is HOME); `namespaces=False`
    compiles them as files are."""
    loaded = [parse_object(d, "t.yaml", str(i))[0] for i, d in enumerate(docs)]
    return compile_config(loaded, namespaces=namespaces, home=HOME)
