"""Read LLMProvider and LLMRoute objects from YAML files, the way `kubectl apply -f` takes them.

A path is a file or a directory (its `*.yaml`, `*.yml` and `*.json` files, sorted by name,
not recursive). Files hold one or more YAML documents; a `kind: List` is unpacked; kinds
other than ours are skipped. When two documents name the same kind/namespace/name, the
later one wins, as a second `kubectl apply` of an updated object would.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError
from pydantic_core import ErrorDetails

from .models import (
    API_VERSION,
    BUDGET_API_VERSION,
    BUDGET_KIND,
    KINDS,
    PRICE_KIND,
    LLMPriceTable,
    LLMProvider,
    LLMRoute,
    LLMTokenRateLimit,
    OpenAIConfig,
)
from .problems import Problem

try:  # libyaml's loader is several times faster; fall back to pure Python where absent
    _YamlLoader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _YamlLoader = yaml.SafeLoader

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Resource = LLMProvider | LLMRoute | LLMTokenRateLimit | LLMPriceTable


@dataclass(frozen=True)
class Loaded:
    """One parsed object and where it came from."""

    resource: Resource
    file: str

    @property
    def key(self) -> tuple[str, str, str]:
        meta = self.resource.metadata
        return (self.resource.kind, meta.namespace, meta.name)

    @property
    def label(self) -> str:
        meta = self.resource.metadata
        return f"{self.resource.kind} {meta.namespace}/{meta.name}"


def config_files(paths: Sequence[str | Path]) -> list[Path]:
    """The files a list of paths stands for, in load order. Missing paths raise FileNotFoundError."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def load_paths(paths: Sequence[str | Path], environ: dict[str, str] | None = None
               ) -> tuple[list[Loaded], list[Problem]]:
    """Parse every object in `paths`. Returns the objects (later duplicates winning) and the problems."""
    problems: list[Problem] = []
    try:
        files = config_files(paths)
    except FileNotFoundError as exc:
        return [], [Problem(str(exc))]
    by_key: dict[tuple[str, str, str], Loaded] = {}
    for file in files:
        try:
            text = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(Problem(f"cannot read: {exc}", file=str(file)))
            continue
        objs, file_problems = load_text(text, str(file), environ)
        problems.extend(file_problems)
        for obj in objs:
            by_key.pop(obj.key, None)  # re-insert so the dict's order is the order of the last apply
            by_key[obj.key] = obj
    return list(by_key.values()), problems


def load_text(text: str, file: str, environ: dict[str, str] | None = None) -> tuple[list[Loaded], list[Problem]]:
    """Parse the YAML documents of one file."""
    try:
        docs = list(yaml.load_all(text, Loader=_YamlLoader))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        problem = getattr(exc, "problem", None) or str(exc)
        return [], [Problem(f"invalid YAML: {problem}", file=where)]
    loaded: list[Loaded] = []
    problems: list[Problem] = []
    for number, doc in _documents(docs):
        obj, doc_problems = parse_object(doc, file, number, environ)
        problems.extend(doc_problems)
        if obj is not None:
            loaded.append(obj)
    return loaded, problems


def _documents(docs: list[Any]) -> list[tuple[str, Any]]:
    """Each document with its place in the file ("2", or "2 item 1" inside a `kind: List`)."""
    out: list[tuple[str, Any]] = []
    for position, doc in enumerate(docs, start=1):
        if isinstance(doc, dict) and doc.get("kind") == "List" and isinstance(doc.get("items"), list):
            out.extend((f"{position} item {i}", item) for i, item in enumerate(doc["items"], start=1))
        elif doc is not None:
            out.append((str(position), doc))
    return out


MODELS: dict[str, type[LLMProvider] | type[LLMRoute] | type[LLMTokenRateLimit] | type[LLMPriceTable]] = {
    "LLMProvider": LLMProvider, "LLMRoute": LLMRoute, BUDGET_KIND: LLMTokenRateLimit, PRICE_KIND: LLMPriceTable}
OWN_KINDS = (BUDGET_KIND, PRICE_KIND)  # our own kinds, in our own API group


def parse_object(doc: Any, file: str, number: str, environ: dict[str, str] | None = None,
                 secrets: SecretLookup | None = None,
                 key_env: dict[str, str] | None = None) -> tuple[Loaded | None, list[Problem]]:
    """Turn one document into a model, or say why not. Other kinds are skipped silently.
    `key_env` (Kubernetes objects, which anyone allowed to create one writes): `${NAME}` expands
    only where it maps NAME to the provider's own host; None (files, which the operator writes):
    any variable expands."""
    if not isinstance(doc, dict):
        return None, [Problem(f"document {number} is not a mapping", file=file)]
    kind = doc.get("kind")
    if kind not in KINDS and kind not in OWN_KINDS:
        return None, []
    found_meta = doc.get("metadata")
    meta: dict[str, Any] = found_meta if isinstance(found_meta, dict) else {}
    label = f"{kind} {meta.get('namespace') or 'default'}/{meta.get('name') or '<unnamed>'}"
    expected = BUDGET_API_VERSION if kind in OWN_KINDS else API_VERSION
    if doc.get("apiVersion") != expected:
        return None, [Problem(f"unsupported apiVersion {doc.get('apiVersion')!r}, expected {expected!r}",
                              file=file, obj=label, field="apiVersion")]
    model = MODELS[kind]
    try:
        resource = model.model_validate(doc)
    except ValidationError as exc:
        return None, [Problem(_error_message(err), file=file, obj=label, field=_field_path(err["loc"]))
                      for err in exc.errors()]
    if isinstance(resource, LLMProvider):
        resource, key_problems = _resolve_api_keys(resource, environ if environ is not None else os.environ, secrets,
                                                   key_env)
        if key_problems:
            return None, [Problem(msg, file=file, obj=label, field=field, reason=reason)
                          for field, msg, reason in key_problems]
    return Loaded(resource, file), []


SecretLookup = Callable[[str, str, str], "str | None"]  # (namespace, name, key) -> value


def key_env_allowed(name: str, host: str, key_env: dict[str, str] | None) -> bool:
    """May `${name}` expand in an LLMProvider for `host`? Always in files; in Kubernetes only where
    the operator bound the variable to that host (`--key-env NAME=HOST`), so that whoever may create
    an LLMProvider cannot send the control plane's environment to a host of their choosing."""
    return key_env is None or key_env.get(name) == host.lower()


def _resolve_api_keys(provider: LLMProvider, environ: Mapping[str, str], secrets: SecretLookup | None,
                      key_env: dict[str, str] | None = None) -> tuple[LLMProvider, list[tuple[str, str, str]]]:
    """Each openAIConfig's key: `${VAR}` in apiKey read from the environment, apiKeySecretRef read
    from a Secret of the provider's namespace. An unset variable or a missing Secret is an error."""
    problems: list[tuple[str, str, str]] = []  # (field, message, reason)
    namespace = provider.metadata.namespace

    def expand(value: str, field: str) -> str:
        def sub(match: re.Match[str]) -> str:
            name = match.group(1)
            host = provider.spec.host
            if not key_env_allowed(name, host, key_env):
                problems.append((field, f"${{{name}}} may not be used here: the control plane binds no environment "
                                        f"variable {name} to host {host} (--key-env {name}={host})",
                                 "KeyEnvNotAllowed"))
                return ""
            found = environ.get(name)
            if found is None:
                problems.append((field, f"environment variable {name} is not set", "InvalidAPIKey"))
                return ""
            if not found.strip():
                problems.append((field, f"environment variable {name} is empty", "InvalidAPIKey"))
            return found

        return _ENV_REF.sub(sub, value)

    def resolve(cfg: OpenAIConfig, path: str) -> OpenAIConfig:
        if cfg.api_key is not None:
            return cfg.model_copy(update={"api_key": expand(cfg.api_key, f"{path}.apiKey")})
        ref = cfg.api_key_secret_ref
        if ref is None:
            return cfg
        field = f"{path}.apiKeySecretRef"
        if secrets is None:
            problems.append((field, "a Secret can only be read with the Kubernetes source (--kubernetes)",
                             "InvalidAPIKey"))
            return cfg
        value = secrets(namespace, ref.name, ref.key)
        if value is None:
            problems.append((field, f"Secret {namespace}/{ref.name} has no key {ref.key!r} (or does not exist)",
                             "SecretNotFound"))
            return cfg
        if not value.strip():
            problems.append((field, f"key {ref.key!r} of Secret {namespace}/{ref.name} is empty", "InvalidAPIKey"))
        return cfg.model_copy(update={"api_key": value})

    configs = provider.spec.configs
    default = configs.default_config
    new_configs = configs.model_copy(update={
        "default_config": default.model_copy(update={
            "openai_config": resolve(default.openai_config, "spec.configs.defaultConfig.openAIConfig")}),
        "route_specific_configs": {
            rule: cfg.model_copy(update={
                "openai_config": resolve(cfg.openai_config, f"spec.configs.routeSpecificConfigs.{rule}.openAIConfig")})
            for rule, cfg in configs.route_specific_configs.items()},
    })
    return provider.model_copy(update={"spec": provider.spec.model_copy(update={"configs": new_configs})}), problems


def _field_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _error_message(err: ErrorDetails) -> str:
    if err["type"] == "extra_forbidden":
        return "unknown field (check its spelling)"
    if err["type"] == "missing":
        return "required field is missing"
    return err["msg"].removeprefix("Value error, ")
