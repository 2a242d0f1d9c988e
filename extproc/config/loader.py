"""Read LLMProvider and LLMRoute objects from YAML files, the way `kubectl apply -f` takes them.

A path is a file or a directory (its `*.yaml`, `*.yml` and `*.json` files, sorted by name,
not recursive). Files hold one or more YAML documents; a `kind: List` is unpacked. When two
documents name the same kind/namespace/name, the later one wins, as a second `kubectl apply`
of an updated object would.

Every document is read as one of (`classify`): ours (parsed); Kubernetes' or Istio's own kinds,
kept beside ours as the seed keeps its Service (skipped, noted for `extproc validate`); a kind
the gateway knows but does not read from files, a Secret (skipped with a warning); anything
else, a typo included (`LLMRoutes`), an error naming file and document, with a "did you mean".
"""

from __future__ import annotations

import difflib
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
    DATA_POLICY_KIND,
    OWN_KINDS,
    PRICE_KIND,
    ApiConfig,
    LLMDataPolicy,
    LLMPriceTable,
    LLMProvider,
    LLMRoute,
    LLMTokenRateLimit,
    ProviderConfig,
)
from .problems import Problem

try:  # libyaml's loader is several times faster; fall back to pure Python where absent
    _YamlLoader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _YamlLoader = yaml.SafeLoader

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")

Resource = LLMProvider | LLMRoute | LLMTokenRateLimit | LLMPriceTable | LLMDataPolicy


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
            files.extend(_directory_files(path))
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return files


def _directory_files(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.suffix in CONFIG_SUFFIXES and p.is_file())


def load_paths(paths: Sequence[str | Path], environ: dict[str, str] | None = None
               ) -> tuple[list[Loaded], list[Problem]]:
    """Parse every object in `paths`. Returns the objects (later duplicates winning) and the problems."""
    problems: list[Problem] = []
    try:
        files = config_files(paths)
    except FileNotFoundError as exc:
        return [], [Problem(str(exc))]
    for raw in paths:  # a directory that holds no config file at all is most likely the wrong one
        if Path(raw).is_dir() and not _directory_files(Path(raw)):
            problems.append(Problem(f"no config files ({', '.join('*' + s for s in CONFIG_SUFFIXES)}) in this "
                                    f"directory: nothing to serve", file=str(raw), severity="warning",
                                    reason="EmptyDirectory"))
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


MODELS: dict[str, type[LLMProvider] | type[LLMRoute] | type[LLMTokenRateLimit] | type[LLMPriceTable]
             | type[LLMDataPolicy]] = {
    "LLMProvider": LLMProvider, "LLMRoute": LLMRoute, BUDGET_KIND: LLMTokenRateLimit, PRICE_KIND: LLMPriceTable,
    DATA_POLICY_KIND: LLMDataPolicy}
API_VERSIONS = {kind: BUDGET_API_VERSION if kind in OWN_KINDS else API_VERSION for kind in MODELS}
OUR_GROUPS = {version.split("/")[0] for version in API_VERSIONS.values()}
READS = (f"LLMProvider and LLMRoute ({API_VERSION}), LLMTokenRateLimit, LLMPriceTable and LLMDataPolicy "
         f"({BUDGET_API_VERSION})")
# Kinds the gateway knows but does not read from files: why, and what to do instead.
NOT_FROM_FILES = {("v1", "Secret"): "a Secret is read only with --kubernetes (an LLMProvider's apiKeySecretRef); "
                                    "in files give the key as apiKey: ${VARIABLE}"}
# API groups of Kubernetes itself and of Istio: their objects are skipped (the seed keeps a
# Service beside its LLMRoutes), with no word but a note.
_BUILT_IN_GROUPS = frozenset({"", "apps", "batch", "policy", "autoscaling"})


def _group(api_version: str) -> str:
    return api_version.rpartition("/")[0] if "/" in api_version else ""


def is_kubernetes_or_istio(api_version: str) -> bool:
    group = _group(api_version)
    return group in _BUILT_IN_GROUPS or group.endswith((".k8s.io", ".istio.io"))


def near_kind(kind: str) -> str | None:
    """One of our kinds `kind` is most likely a typo of (case, a plural, a letter or two)."""
    for ours in MODELS:
        if kind.lower() in (ours.lower(), ours.lower() + "s"):
            return ours
    found = difflib.get_close_matches(kind, list(MODELS), n=1, cutoff=0.8)
    return found[0] if found else None


def classify(kind: object, api_version: object) -> tuple[str, str | None]:
    """What a document is: ("ours", None), ("skip", None) for Kubernetes' and Istio's own
    kinds, ("warn", why) for a kind the gateway does not read from files, ("error", what is
    wrong) for a kind it does not know."""
    if not isinstance(kind, str) or not kind:
        return "error", "the document has no kind"
    version = api_version if isinstance(api_version, str) else ""
    if kind in MODELS:
        return "ours", None
    near = near_kind(kind)
    if near is not None:
        return "error", f"unknown kind {kind!r}: did you mean {near} ({API_VERSIONS[near]})?"
    if (version, kind) in NOT_FROM_FILES:
        return "warn", NOT_FROM_FILES[version, kind]
    if _group(version) in OUR_GROUPS:
        return "error", f"unknown kind {kind!r} in {version}: the gateway reads {READS}"
    if is_kubernetes_or_istio(version):
        return "skip", None
    return "error", (f"unknown kind {kind!r} ({version or 'no apiVersion'}): the gateway reads {READS}, and skips "
                     f"Kubernetes' and Istio's own kinds; keep other manifests out of its config directory")


def parse_object(doc: Any, file: str, number: str, environ: dict[str, str] | None = None,
                 secrets: SecretLookup | None = None,
                 key_env: dict[str, str] | None = None) -> tuple[Loaded | None, list[Problem]]:
    """Turn one document into a model, or say why not (`classify`: Kubernetes' and Istio's own
    kinds are skipped with a note). `key_env` (Kubernetes objects, which anyone allowed to create
    one writes): `${NAME}` expands only where it maps NAME to the provider's own host; None
    (files, which the operator writes): any variable expands."""
    if not isinstance(doc, dict):
        return None, [Problem(f"document {number} is not a mapping", file=file)]
    kind = doc.get("kind")
    found_meta = doc.get("metadata")
    meta: dict[str, Any] = found_meta if isinstance(found_meta, dict) else {}
    label = f"{kind} {meta.get('namespace') or 'default'}/{meta.get('name') or '<unnamed>'}"
    verdict, why = classify(kind, doc.get("apiVersion"))
    if verdict != "ours":
        where = f"document {number} ({label})" if isinstance(kind, str) and kind else f"document {number}"
        if verdict == "error":
            return None, [Problem(why or "", file=file, obj=where, field="kind")]
        why = why or f"a Kubernetes or Istio object ({doc.get('apiVersion') or 'no apiVersion'}): not for the gateway"
        return None, [Problem(f"{why}; skipped", file=file, obj=where,
                              severity="warning" if verdict == "warn" else "note", reason="Skipped")]
    assert isinstance(kind, str)
    spec = doc.get("spec")
    host = spec.get("host") if isinstance(spec, dict) and isinstance(spec.get("host"), str) else None
    expected = API_VERSIONS[kind]
    if doc.get("apiVersion") != expected:
        return None, [Problem(f"unsupported apiVersion {doc.get('apiVersion')!r}, expected {expected!r}",
                              file=file, obj=label, field="apiVersion", host=host)]
    model = MODELS[kind]
    try:
        resource = model.model_validate(doc)
    except ValidationError as exc:
        return None, [Problem(_error_message(err), file=file, obj=label, field=_field_path(err["loc"]), host=host)
                      for err in exc.errors()]
    if isinstance(resource, LLMProvider):
        resource, key_problems = _resolve_api_keys(resource, environ if environ is not None else os.environ, secrets,
                                                   key_env)
        if key_problems:
            return None, [Problem(msg, file=file, obj=label, field=field, reason=reason, host=host)
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
    """Each provider config's credentials (an apiKey; Bedrock's key pair and session token): `${VAR}`
    in the value read from the environment, a `...SecretRef` read from a Secret of the provider's
    namespace. An unset variable or a missing Secret is an error."""
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

    def resolve(cfg: ApiConfig, path: str) -> ApiConfig:
        update: dict[str, str] = {}
        for name, alias, ref_name, ref_alias in cfg.CREDENTIALS:
            inline = getattr(cfg, name)
            if inline is not None:
                update[name] = expand(inline, f"{path}.{alias}")
                continue
            ref = getattr(cfg, ref_name)
            if ref is None:
                continue
            field = f"{path}.{ref_alias}"
            if secrets is None:
                problems.append((field, "a Secret can only be read with the Kubernetes source (--kubernetes)",
                                 "InvalidAPIKey"))
                continue
            value = secrets(namespace, ref.name, ref.key)
            if value is None:
                problems.append((field, f"Secret {namespace}/{ref.name} has no key {ref.key!r} (or does not exist)",
                                 "SecretNotFound"))
                continue
            if not value.strip():
                problems.append((field, f"key {ref.key!r} of Secret {namespace}/{ref.name} is empty",
                                 "InvalidAPIKey"))
            update[name] = value
        return cfg.model_copy(update=update) if update else cfg

    def resolved(config: ProviderConfig, path: str) -> ProviderConfig:
        name, alias, api_config = config.api_config
        return config.model_copy(update={name: resolve(api_config, f"{path}.{alias}")})

    configs = provider.spec.configs
    new_configs = configs.model_copy(update={
        "default_config": resolved(configs.default_config, "spec.configs.defaultConfig"),
        "route_specific_configs": {
            rule: resolved(cfg, f"spec.configs.routeSpecificConfigs.{rule}")
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
