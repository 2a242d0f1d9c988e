"""The `istio.alibabacloud.com/v1beta1` custom resources, as pydantic models.

The models mirror the fields ASM documents for `LLMProvider` and `LLMRoute`, every one of them
served. Unknown fields under `spec` are errors (they are usually typos).
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Annotated, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.config import JsonDict

from ..policy.caller import LABEL_VALUE_PATTERN, label_problems
from ..policy.capacity import MAX_LIMIT

API_VERSION = "istio.alibabacloud.com/v1beta1"
KINDS = ("LLMProvider", "LLMRoute")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SecretKeyRef(_Strict):
    """A key of a Secret in the object's own namespace (our extension to ASM's schema)."""

    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


# A credential field and its Secret reference (our extension): (field, alias, ref field, ref alias)
Credential = tuple[str, str, str, str]
API_KEY: Credential = ("api_key", "apiKey", "api_key_secret_ref", "apiKeySecretRef")


class _ApiConfig(_Strict):
    """What every provider API's config has: the model, and credentials given inline (`${VAR}`
    expanded from the environment) or by a Secret reference, never both."""

    CREDENTIALS: ClassVar[tuple[Credential, ...]] = (API_KEY,)
    API: ClassVar[str] = "openai"

    model: str | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_key_source(self) -> _ApiConfig:
        for name, alias, ref_name, ref_alias in self.CREDENTIALS:
            if getattr(self, name) is not None and getattr(self, ref_name) is not None:
                raise ValueError(f"set {alias} or {ref_alias}, not both")
        return self


class OpenAIConfig(_ApiConfig):
    api_key: str | None = Field(default=None, alias="apiKey", min_length=1, repr=False)
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    stream: bool | None = None
    # Our extension: the model embeddings requests are sent with (replacing the client's);
    # unset, the client's model is kept. `model` stays the chat model.
    embedding_model: str | None = Field(default=None, alias="embeddingModel", min_length=1,
                                        description="Model for embeddings requests (unset: the client's).")


# --- our extensions: providers that speak another API than OpenAI's (docs/translation.md) ---

class AzureOpenAIConfig(_ApiConfig):
    """Azure OpenAI: OpenAI's bodies, sent to a deployment with an `api-version` and an `api-key`."""

    API: ClassVar[str] = "azure"
    model: str | None = Field(default=None, min_length=1,
                              description="The model name requests and metrics report (unset: the deployment).")
    deployment: str | None = Field(default=None, min_length=1, description="The chat deployment's name.")
    api_version: str = Field(default="2024-10-21", alias="apiVersion", min_length=1,
                             pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}(-preview)?$",
                             description="The api-version query parameter, e.g. 2024-10-21.")
    embedding_deployment: str | None = Field(default=None, alias="embeddingDeployment", min_length=1,
                                             description="The deployment embeddings requests go to.")
    api_key: str | None = Field(default=None, alias="apiKey", min_length=1, repr=False,
                                description="Sent as `api-key`.")
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    stream: bool | None = None


class AnthropicConfig(_ApiConfig):
    """Anthropic's Messages API (`POST /v1/messages`, `x-api-key`, `anthropic-version`)."""

    API: ClassVar[str] = "anthropic"
    api_key: str | None = Field(default=None, alias="apiKey", min_length=1, repr=False,
                                description="Sent as `x-api-key`.")
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    version: str | None = Field(default=None, min_length=1, pattern=r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$",
                                description="The anthropic-version header (default 2023-06-01).")
    max_tokens: int | None = Field(default=None, alias="maxTokens", ge=1,
                                   description="max_tokens where an OpenAI request sets none (default 4096).")


class GeminiConfig(_ApiConfig):
    """Google's Gemini API (`models/{model}:generateContent`, `x-goog-api-key`)."""

    API: ClassVar[str] = "gemini"
    api_key: str | None = Field(default=None, alias="apiKey", min_length=1, repr=False,
                                description="Sent as `x-goog-api-key`.")
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    api_version: str | None = Field(default=None, alias="apiVersion", pattern=r"^v[0-9][a-z0-9]*$",
                                    description="The API version in the path (default v1beta).")


class BedrockConfig(_ApiConfig):
    """Amazon Bedrock's Converse API, every request signed with SigV4 for `region`."""

    API: ClassVar[str] = "bedrock"
    CREDENTIALS: ClassVar[tuple[Credential, ...]] = (
        ("access_key_id", "accessKeyId", "access_key_id_secret_ref", "accessKeyIdSecretRef"),
        ("secret_access_key", "secretAccessKey", "secret_access_key_secret_ref", "secretAccessKeySecretRef"),
        ("session_token", "sessionToken", "session_token_secret_ref", "sessionTokenSecretRef"))
    model: str | None = Field(default=None, min_length=1, description="The model ID (or inference profile).")
    region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-[0-9]+$",
                               description="The AWS region, e.g. us-east-1.")
    access_key_id: str | None = Field(default=None, alias="accessKeyId", min_length=1, repr=False)
    access_key_id_secret_ref: SecretKeyRef | None = Field(default=None, alias="accessKeyIdSecretRef")
    secret_access_key: str | None = Field(default=None, alias="secretAccessKey", min_length=1, repr=False)
    secret_access_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="secretAccessKeySecretRef")
    session_token: str | None = Field(default=None, alias="sessionToken", min_length=1, repr=False)
    session_token_secret_ref: SecretKeyRef | None = Field(default=None, alias="sessionTokenSecretRef")


ApiConfig = OpenAIConfig | AzureOpenAIConfig | AnthropicConfig | GeminiConfig | BedrockConfig
# ProviderConfig's fields, one per API: (field, alias)
API_CONFIG_FIELDS = (("openai_config", "openAIConfig"), ("azure_openai_config", "azureOpenAIConfig"),
                     ("anthropic_config", "anthropicConfig"), ("gemini_config", "geminiConfig"),
                     ("bedrock_config", "bedrockConfig"))


class ProviderConfig(_Strict):
    """One provider config: exactly one of the API configs (openAIConfig, ASM's; the others ours)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True,
                              json_schema_extra={"maxProperties": 1})
    openai_config: OpenAIConfig | None = Field(default=None, alias="openAIConfig")
    azure_openai_config: AzureOpenAIConfig | None = Field(default=None, alias="azureOpenAIConfig")
    anthropic_config: AnthropicConfig | None = Field(default=None, alias="anthropicConfig")
    gemini_config: GeminiConfig | None = Field(default=None, alias="geminiConfig")
    bedrock_config: BedrockConfig | None = Field(default=None, alias="bedrockConfig")

    @model_validator(mode="after")
    def _one_api(self) -> ProviderConfig:
        given = [alias for name, alias in API_CONFIG_FIELDS if getattr(self, name) is not None]
        if len(given) != 1:
            which = f"got {', '.join(given)}" if given else "got none"
            raise ValueError("set exactly one of " + ", ".join(a for _, a in API_CONFIG_FIELDS) + f" ({which})")
        return self

    @property
    def api_config(self) -> tuple[str, str, ApiConfig]:
        """(field, alias, config) of the one API config that is set."""
        for name, alias in API_CONFIG_FIELDS:
            config = getattr(self, name)
            if config is not None:
                return name, alias, config
        raise AssertionError("a ProviderConfig holds one API config")


class ProviderConfigs(_Strict):
    default_config: ProviderConfig = Field(alias="defaultConfig")
    route_specific_configs: dict[str, ProviderConfig] = Field(
        default_factory=dict, alias="routeSpecificConfigs"
    )


HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"


DURATION_PATTERN = r"^[0-9]+(ms|s|m|h)$"
# exportTo entries: ".", "*" or a namespace name (a DNS label)
ExportTarget = Annotated[str, Field(pattern=r"^(\.|\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$", max_length=63)]


# Kubernetes labels: the CRD's schema checks the values at apply time (it cannot say it for a
# map's keys); `_labels` checks both, with a message naming the label.
LabelValue = Annotated[str, Field(json_schema_extra={"pattern": LABEL_VALUE_PATTERN})]
LabelMap = dict[str, LabelValue]


def _labels(labels: dict[str, str] | None) -> dict[str, str] | None:
    problems = label_problems(labels or {})
    if problems:
        raise ValueError("; ".join(problems))
    return labels


class WorkloadSelector(_Strict):
    """Istio's workload selector: the proxies (by their pod's labels, in the object's namespace)
    an object applies to. `labels` as Istio's Sidecar and EnvoyFilter write it, or `matchLabels`
    as its security policies do; not both."""

    labels: LabelMap | None = Field(default=None, description="Labels a proxy's pod must all have.")
    match_labels: LabelMap | None = Field(default=None, alias="matchLabels",
                                          description="The same as labels (Istio's other spelling).")

    _keys = field_validator("labels", "match_labels")(_labels)

    @model_validator(mode="after")
    def _one_spelling(self) -> WorkloadSelector:
        if self.labels is not None and self.match_labels is not None:
            raise ValueError("set labels or matchLabels, not both")
        return self

    @property
    def selector(self) -> dict[str, str]:
        return dict(self.labels if self.labels is not None else self.match_labels or {})


def parse_duration(text: str) -> float:
    """"1500ms", "30s", "5m", "1h" in seconds."""
    for unit, scale in (("ms", 0.001), ("s", 1), ("m", 60), ("h", 3600)):
        if text.endswith(unit) and text[: -len(unit)].isdigit():
            return int(text[: -len(unit)]) * scale
    raise ValueError(f"{text!r} is not a duration like 1500ms, 30s, 5m or 1h")


class OutlierDetection(_Strict):
    """Our extension, Istio DestinationRule style: passive health for failover (docs/failover.md)."""

    consecutive_errors: int = Field(default=3, ge=1, alias="consecutiveErrors",
                                    description="Failed attempts in a row after which the provider cools down.")
    base_ejection_time: str = Field(default="30s", alias="baseEjectionTime", pattern=DURATION_PATTERN,
                                    description="How long a provider cools down, e.g. 30s.")

    @field_validator("base_ejection_time")
    @classmethod
    def _positive(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError("baseEjectionTime must be more than zero")
        return value


class TCPSettings(_Strict):
    max_connections: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, alias="maxConnections",
        description="Connections to the provider at once (HTTP/1.1 needs one per request in flight). Default 10000.")


class HTTPSettings(_Strict):
    http1_max_pending_requests: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, alias="http1MaxPendingRequests",
        description="Requests waiting for a connection to the provider. Default 10000.")
    http2_max_requests: int | None = Field(
        default=None, ge=1, le=MAX_LIMIT, alias="http2MaxRequests",
        description="Requests in flight to the provider, HTTP/1.1 and HTTP/2 alike. Default 10000.")


class ConnectionPool(_Strict):
    """Our extension, Istio DestinationRule style: how many requests the gateway keeps in flight
    to the provider (Envoy's circuit breakers); past a limit a request gets 503 `overloaded` with
    Retry-After (docs/scaling.md)."""

    tcp: TCPSettings | None = None
    http: HTTPSettings | None = None


class LLMProviderSpec(_Strict):
    host: str = Field(min_length=1, json_schema_extra={"pattern": HOST_PATTERN})
    path: str = Field(default="/v1/chat/completions", pattern=r"^/")
    # Our extension: the provider's OpenAI base path, for embeddings, completions and models,
    # when `path` does not end in /chat/completions (then the base is `path` without it).
    base_path: str | None = Field(default=None, alias="basePath", pattern=r"^/",
                                  description="The provider's OpenAI base path, e.g. /compatible-mode/v1 "
                                              "(unset: path without /chat/completions).")
    configs: ProviderConfigs
    # Our extension: how long the provider has for a whole answer (streamed ones included).
    timeout: str | None = Field(default=None, pattern=DURATION_PATTERN,
                                description="Time the provider has for the whole answer, e.g. 30s or 5m "
                                            "(no total bound unless set).")
    outlier_detection: OutlierDetection | None = Field(default=None, alias="outlierDetection")
    connection_pool: ConnectionPool | None = Field(default=None, alias="connectionPool")
    workload_selector: WorkloadSelector | None = Field(
        default=None, alias="workloadSelector",
        description="Only proxies whose pod has these labels (in this namespace) see this provider.")
    gateways: list[str] | None = Field(
        default=None, description="Where this provider is decided: 'mesh' (the sidecars) and/or egress gateways "
                                  "(namespace/name). Default: wherever the routes naming it are.")
    # Our extension (as Istio's exportTo): the namespaces whose workloads may use this object.
    export_to: list[ExportTarget] | None = Field(
        default=None, alias="exportTo",
        description="Namespaces whose workloads may use this object: '.' (its own), '*' (all) or names. "
                    "Default: its own namespace; all for objects in the control plane's namespace.")

    @field_validator("host")
    @classmethod
    def _host_is_a_name(cls, value: str) -> str:
        return _check_host(value)

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= 0:
            raise ValueError("timeout must be more than zero")
        return value

    @property
    def timeout_s(self) -> float | None:
        """The total bound on an answer, only where the config sets one."""
        return parse_duration(self.timeout) if self.timeout else None


class StringMatch(_Strict):
    """Istio's StringMatch: at most one of exact, prefix, regex; none means "present"."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True,
                              json_schema_extra={"maxProperties": 1})

    exact: str | None = None
    prefix: str | None = None
    regex: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> StringMatch:
        given = [k for k in ("exact", "prefix", "regex") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"set only one of exact, prefix, regex (got {', '.join(given)})")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"invalid regex {self.regex!r}: {exc}") from None
        return self


class RouteMatch(_Strict):
    headers: dict[str, StringMatch] = Field(default_factory=dict)
    source_labels: LabelMap | None = Field(
        default=None, alias="sourceLabels",
        description="The calling pod's labels must include all of these (with headers, both must hold).")
    gateways: list[str] | None = Field(
        default=None, description="The proxies this match applies at ('mesh', namespace/name); unset, the "
                                  "route's gateways.")

    _keys = field_validator("source_labels")(_labels)


POOL_GROUP = "inference.networking.k8s.io"  # the Gateway API Inference Extension's InferencePool (v1)
BACKEND_KINDS = {"Service": "", "InferencePool": POOL_GROUP}  # kind -> its API group


class ObjectRef(_Strict):
    """ASM's `backendRef`: an in-cluster Service or InferencePool of model servers, and (our
    extension) how a request is rewritten for them, as an LLMProvider's config does for a
    provider (docs/in-cluster-models.md)."""

    group: str = Field(default="", description="'' for a Service, inference.networking.k8s.io for an InferencePool.")
    kind: Literal["Service", "InferencePool"] = Field(default="Service", description="Service or InferencePool.")
    name: str = Field(min_length=1, max_length=253)
    namespace: str | None = Field(default=None, min_length=1, max_length=63,
                                  description="The route's own namespace (the only one allowed); unset: the same.")
    port: int | None = Field(default=None, ge=1, le=65535,
                             description="A Service's port (unset: its only port); an InferencePool's targetPort.")
    # our extensions: the request as the model servers take it
    path: str = Field(default="/v1/chat/completions", pattern=r"^/",
                      description="The model servers' chat path (their OpenAI base path is it without "
                                  "/chat/completions).")
    model: str | None = Field(default=None, min_length=1,
                              description="The model the servers are asked for (unset: the client's, e.g. a LoRA "
                                          "adapter's name).")
    stream: bool | None = Field(default=None, description="Force streaming on or off (unset: as the client asks).")
    tls: bool = Field(default=False, description="TLS to the endpoints (certificate name: the Service's or "
                                                 "pool's DNS name, <name>.<namespace>.svc).")
    timeout: str | None = Field(default=None, pattern=DURATION_PATTERN,
                                description="Time the model server has for the whole answer (unset: no bound).")

    @model_validator(mode="after")
    def _group_of_kind(self) -> ObjectRef:
        wanted = BACKEND_KINDS[self.kind]
        if self.group != wanted:
            raise ValueError(f"group of a {self.kind} is {wanted!r}, not {self.group!r}")
        return self


_ONE_TARGET: JsonDict = {"x-kubernetes-validations": [{"rule": "has(self.providerHost) != has(self.backendRef)",
                                            "message": "set providerHost or backendRef, not both"}]}


class BackendRef(_Strict):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, json_schema_extra=_ONE_TARGET)

    provider_host: str | None = Field(default=None, alias="providerHost", min_length=1)
    backend_ref: ObjectRef | None = Field(default=None, alias="backendRef",
                                          description="An in-cluster Service or InferencePool (not with providerHost).")
    weight: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_target(self) -> BackendRef:
        _one_of(self)
        return self


class FallbackRef(_Strict):
    """Our extension: a provider (or a pool of model servers) tried after the rule's own
    backendRefs (docs/failover.md)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True, json_schema_extra=_ONE_TARGET)

    provider_host: str | None = Field(default=None, alias="providerHost", min_length=1)
    backend_ref: ObjectRef | None = Field(default=None, alias="backendRef",
                                          description="An in-cluster Service or InferencePool (not with providerHost).")

    @model_validator(mode="after")
    def _one_target(self) -> FallbackRef:
        _one_of(self)
        return self


def _one_of(ref: BackendRef | FallbackRef) -> None:
    if ref.provider_host is not None and ref.backend_ref is not None:
        raise ValueError("set providerHost or backendRef, not both")
    if ref.provider_host is None and ref.backend_ref is None:
        raise ValueError("set providerHost (an LLMProvider's host) or backendRef (a Service or InferencePool)")


RETRY_ON_CONDITIONS = ("connect-failure", "reset", "5xx", "gateway-error", "refused-stream")


class Retries(_Strict):
    """Our extension, Istio VirtualService style: further attempts, each to the next provider."""

    attempts: int = Field(ge=0, description="Further attempts after the first one, each to the next provider.")
    per_try_timeout: str | None = Field(default=None, alias="perTryTimeout", pattern=DURATION_PATTERN,
                                        description="Time to the first byte of an attempt's answer, e.g. 20s.")
    retry_on: list[str] = Field(default_factory=lambda: ["connect-failure", "reset", "5xx", "429"],
                                      alias="retryOn",
                                      description="connect-failure, reset, 5xx, gateway-error, refused-stream, "
                                                  "or a status code such as 429 or 503.")

    @field_validator("per_try_timeout")
    @classmethod
    def _positive(cls, value: str | None) -> str | None:
        if value is not None and parse_duration(value) <= 0:
            raise ValueError("perTryTimeout must be more than zero")
        return value

    @field_validator("retry_on", mode="before")
    @classmethod
    def _codes_as_text(cls, values: object) -> object:
        """A status code may be written as a number (429) or as text ("429")."""
        if isinstance(values, list):
            return [str(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in values]
        return values

    @field_validator("retry_on")
    @classmethod
    def _known(cls, values: list[str]) -> list[str]:
        for value in values:
            text = str(value)
            if text in RETRY_ON_CONDITIONS:
                continue
            if text.isdigit() and 400 <= int(text) <= 599:
                continue
            raise ValueError(f"unknown retryOn value {value!r}: use {', '.join(RETRY_ON_CONDITIONS)} "
                             "or a status code from 400 to 599")
        return values


class RouteRule(_Strict):
    name: str | None = Field(default=None, min_length=1)
    matches: list[RouteMatch] = Field(default_factory=list)
    backend_refs: list[BackendRef] = Field(alias="backendRefs", min_length=1)
    fallback_refs: list[FallbackRef] = Field(default_factory=list, alias="fallbackRefs")
    retries: Retries | None = None

    @model_validator(mode="after")
    def _weights(self) -> RouteRule:
        given = [ref.weight is not None for ref in self.backend_refs]
        if any(given) and not all(given):
            raise ValueError("backendRefs: set weight on every backendRef of a rule, or on none")
        if all(given) and sum(ref.weight or 0 for ref in self.backend_refs) == 0:
            raise ValueError("backendRefs: the weights of a rule add up to zero")
        return self


class LLMRouteSpec(_Strict):
    host: str = Field(min_length=1, json_schema_extra={"pattern": HOST_PATTERN})
    rules: list[RouteRule] = Field(min_length=1)
    workload_selector: WorkloadSelector | None = Field(
        default=None, alias="workloadSelector",
        description="Only proxies whose pod has these labels (in this namespace) see this route.")
    gateways: list[str] | None = None
    # Our extension (as Istio's exportTo): the namespaces whose workloads may use this object.
    export_to: list[ExportTarget] | None = Field(
        default=None, alias="exportTo",
        description="Namespaces whose workloads may use this object: '.' (its own), '*' (all) or names. "
                    "Default: its own namespace; all for objects in the control plane's namespace.")

    @field_validator("host")
    @classmethod
    def _host_is_a_name(cls, value: str) -> str:
        return _check_host(value)

    @model_validator(mode="after")
    def _unique_rule_names(self) -> LLMRouteSpec:
        _check_unique([rule.name for rule in self.rules if rule.name], "rules: rule names must be unique")
        return self


class Metadata(BaseModel):
    """Object metadata: only name and namespace matter; labels and the like are kept out."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str = Field(min_length=1)
    namespace: str = Field(default="default", min_length=1)


class LLMProvider(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    api_version: Literal["istio.alibabacloud.com/v1beta1"] = Field(alias="apiVersion")
    kind: Literal["LLMProvider"]
    metadata: Metadata
    spec: LLMProviderSpec


class LLMRoute(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    api_version: Literal["istio.alibabacloud.com/v1beta1"] = Field(alias="apiVersion")
    kind: Literal["LLMRoute"]
    metadata: Metadata
    spec: LLMRouteSpec


_HOST_RE = re.compile(HOST_PATTERN)


def _check_unique(names: list[str], rule: str) -> None:
    """The one check that names in a list are unique: `rule`, and the repeated names, sorted."""
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"{rule} (repeated: {', '.join(dupes)})")


def _check_host(value: str) -> str:
    if not _HOST_RE.match(value) or value.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is not a host name (letters, digits, '-' and '.'; no port, scheme or IP address)")
    return value.lower()


# --- amounts of money (LLMPriceTable's prices, LLMTokenRateLimit's cost caps) ---

CURRENCY_PATTERN = r"^[A-Z]{3}$"
# a price per million tokens: a decimal with at most six decimals (whole pico-units per token)
PRICE_PATTERN = r"^[0-9]{1,9}(\.[0-9]{1,6})?$"


def _price_text(value: object) -> object:
    """A price written as a YAML number (0.3) is read as its text ("0.3"), never through a float."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float):
        if isinstance(value, int):
            return str(value)
        text = format(Decimal(repr(value)), "f")  # 1e-07 -> "0.0000001": refused, never rounded to 0
        return text.rstrip("0").rstrip(".") if "." in text else text
    return value


PriceText = Annotated[str, BeforeValidator(_price_text), StringConstraints(pattern=PRICE_PATTERN),
                      WithJsonSchema({"type": "string", "pattern": PRICE_PATTERN})]
# a cost cap: an amount of a currency, with at most six decimals (whole micro-units), as text
CostText = PriceText


# --- LLMTokenRateLimit: our own kind, in our own API group (token and request budgets) ---

BUDGET_API_VERSION = "llm-gateway.dev/v1alpha1"
BUDGET_KIND = "LLMTokenRateLimit"
PER_PATTERN = r"^[0-9]+(ms|s|m|h|d)$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+.^_`|~-]+$"
MIN_PER_S, MAX_PER_S = 1.0, 30 * 86400.0


def parse_per(text: str) -> float:
    """A budget's period in seconds: the `spec.timeout` syntax plus days ("30d")."""
    if text.endswith("d") and text[:-1].isdigit():
        return int(text[:-1]) * 86400.0
    return parse_duration(text)


class BudgetKeySpec(_Strict):
    header: str | None = Field(default=None, min_length=1, pattern=HEADER_NAME_PATTERN,
                               description="One budget per value of this request header; a request without it "
                                           "shares the \"\" budget.")
    caller: Literal["namespace", "serviceAccount", "workload"] | None = Field(
        default=None, description="One budget per verified caller: its namespace, ServiceAccount or workload "
                                  "(not a header: an application cannot choose it).")

    @model_validator(mode="after")
    def _one_source(self) -> BudgetKeySpec:
        if (self.header is None) == (self.caller is None):
            raise ValueError("set exactly one of header or caller")
        return self


class BudgetMatch(_Strict):
    headers: dict[str, StringMatch] = Field(default_factory=dict)


class BudgetRuleSpec(_Strict):
    name: str | None = Field(default=None, min_length=1)
    matches: list[BudgetMatch] = Field(default_factory=list)
    tokens: int | None = Field(default=None, ge=1, description="Total tokens (prompt + completion) per `per`. "
                                                               "At least one of tokens and cost.")
    requests: int | None = Field(default=None, ge=1, description="Requests per `per` (optional).")
    cost: CostText | None = Field(default=None, description="What the answers may cost per `per`, in `currency`, "
                                                            "as decimal text (e.g. \"20.00\"), priced by the "
                                                            "LLMPriceTable of the provider that answered. At least "
                                                            "one of tokens and cost.")
    currency: str | None = Field(default=None, pattern=CURRENCY_PATTERN,
                                 description="The currency of `cost` (ISO 4217); unset: the currency of the price "
                                             "tables of the providers the host's route reaches (they must agree).")
    per: str = Field(pattern=PER_PATTERN, description="The period: 1s to 30d, e.g. 1m, 1h, 1d.")

    @field_validator("per")
    @classmethod
    def _per_in_range(cls, value: str) -> str:
        seconds = parse_per(value)
        if not MIN_PER_S <= seconds <= MAX_PER_S:
            raise ValueError(f"per must be between 1s and 30d (got {value})")
        return value

    @field_validator("cost")
    @classmethod
    def _cost_above_zero(cls, value: str | None) -> str | None:
        if value is not None and Decimal(value) <= 0:
            raise ValueError(f"cost must be more than 0 (got {value})")
        return value

    @model_validator(mode="after")
    def _tokens_or_cost(self) -> BudgetRuleSpec:
        if self.tokens is None and self.cost is None:
            raise ValueError("set tokens, cost or both: what the rule caps per `per`")
        if self.currency is not None and self.cost is None:
            raise ValueError("currency is the currency of cost: set cost too (or remove currency)")
        return self

    @property
    def per_s(self) -> float:
        return parse_per(self.per)


class LLMTokenRateLimitSpec(_Strict):
    host: str = Field(min_length=1, json_schema_extra={"pattern": HOST_PATTERN},
                      description="A provider host or an LLMRoute host, as routing knows it.")
    key: BudgetKeySpec | None = None
    rules: list[BudgetRuleSpec] = Field(min_length=1)

    @field_validator("host")
    @classmethod
    def _host_is_a_name(cls, value: str) -> str:
        return _check_host(value)

    @model_validator(mode="after")
    def _unique_rule_names(self) -> LLMTokenRateLimitSpec:
        _check_unique([rule.name for rule in self.rules if rule.name], "rules: rule names must be unique")
        return self


class LLMTokenRateLimit(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    api_version: Literal["llm-gateway.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LLMTokenRateLimit"]
    metadata: Metadata
    spec: LLMTokenRateLimitSpec


# --- LLMPriceTable: our own kind, in our own API group (what tokens cost; docs/cost.md) ---

PRICE_KIND = "LLMPriceTable"


class ModelPrice(_Strict):
    model: str = Field(min_length=1, description="The model name as the gateway sends it to the provider.")
    input: PriceText = Field(description="Price per million input (prompt) tokens, e.g. \"0.30\".")
    output: PriceText = Field(description="Price per million output (completion) tokens.")
    cached_input: PriceText | None = Field(default=None, alias="cachedInput",
                                           description="Price per million cached input tokens; unset, the input "
                                                       "price.")


class LLMPriceTableSpec(_Strict):
    host: str = Field(min_length=1, json_schema_extra={"pattern": HOST_PATTERN},
                      description="The LLMProvider host whose answers these prices apply to.")
    currency: str = Field(pattern=CURRENCY_PATTERN, description="ISO 4217 code of every price here, e.g. USD.")
    models: list[ModelPrice] = Field(min_length=1)

    @field_validator("host")
    @classmethod
    def _host_is_a_name(cls, value: str) -> str:
        return _check_host(value)

    @model_validator(mode="after")
    def _unique_models(self) -> LLMPriceTableSpec:
        _check_unique([price.model for price in self.models], "models: each model is priced once")
        return self


class LLMPriceTable(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    api_version: Literal["llm-gateway.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LLMPriceTable"]
    metadata: Metadata
    spec: LLMPriceTableSpec


# --- LLMDataPolicy: our own kind, in our own API group (what may leave the mesh in a prompt) ---

DATA_POLICY_KIND = "LLMDataPolicy"
OWN_KINDS = (BUDGET_KIND, PRICE_KIND, DATA_POLICY_KIND)  # in BUDGET_API_VERSION's group
DETECTOR_NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"


class JudgeConfig(_Strict):
    """A private model asked whether the prompt holds sensitive data (docs/data-protection.md)."""

    host: str = Field(min_length=1, json_schema_extra={"pattern": HOST_PATTERN},
                      description="A route or provider host this gateway serves (an in-cluster model).")
    model: str | None = Field(default=None, min_length=1,
                              description="The model to ask (unset: the provider config's).")
    timeout: str = Field(default="3s", pattern=DURATION_PATTERN,
                         description="How long the judge has to answer, e.g. 3s.")
    fail_open: bool = Field(default=False, alias="failOpen",
                            description="On a timeout, an error or an answer that is not YES or NO: true lets the "
                                        "request through, false applies the rule's action (default false).")

    @field_validator("host")
    @classmethod
    def _host_is_a_name(cls, value: str) -> str:
        return _check_host(value)

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, value: str) -> str:
        if parse_duration(value) <= 0:
            raise ValueError("timeout must be more than zero")
        return value


class DataDetector(_Strict):
    """One of: a built-in (`builtin`), a pattern (`regex`), words (`keywords`), a judge (`judge`)."""

    builtin: Literal["email", "phone", "china-resident-id", "bank-card", "ipv4", "secret"] | None = Field(
        default=None, description="A built-in detector: email, phone, china-resident-id, bank-card, ipv4, secret.")
    regex: str | None = Field(default=None, min_length=1,
                              description="An RE2 pattern (linear time: no lookaround, no backreferences).")
    keywords: list[Annotated[str, Field(min_length=1)]] | None = Field(
        default=None, min_length=1, description="Words found in any case, anywhere in the text.")
    judge: JudgeConfig | None = None
    name: str | None = Field(default=None, pattern=DETECTOR_NAME_PATTERN,
                             description="The detector's name for regex and keywords (unset: regex, keywords): "
                                         "in metrics, errors and its mask placeholder [NAME].")

    @field_validator("regex")
    @classmethod
    def _re2_can_run(cls, value: str | None) -> str | None:
        from ..policy.data_protection.detectors import check_regex

        if value is not None:
            problem = check_regex(value)
            if problem is not None:
                raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> DataDetector:
        given = [k for k in ("builtin", "regex", "keywords", "judge") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("set exactly one of builtin, regex, keywords, judge"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.name is not None and given[0] not in ("regex", "keywords"):
            raise ValueError(f"name is for regex and keywords detectors (a {given[0]} detector has its own)")
        return self

    @property
    def label(self) -> str:
        """The name it is reported under."""
        if self.builtin is not None:
            return self.builtin
        if self.judge is not None:
            return "judge"
        return self.name or ("regex" if self.regex is not None else "keywords")


class DataRuleSpec(_Strict):
    name: str | None = Field(default=None, min_length=1)
    detectors: list[DataDetector] = Field(min_length=1)
    action: Literal["block", "mask", "log"] = Field(
        description="block: refuse with 400 content_policy_violation; mask: replace each value found with its "
                    "placeholder and forward; log: only count.")

    @model_validator(mode="after")
    def _judge_cannot_mask(self) -> DataRuleSpec:
        judges = sum(d.judge is not None for d in self.detectors)
        if judges > 1:
            raise ValueError("detectors: one judge per rule")
        if self.action == "mask" and judges:
            raise ValueError("a judge finds no text to mask: give a rule with a judge the action block or log")
        return self


class DataResponses(_Strict):
    check: bool = Field(default=False, description="Also check answers, streamed ones as they come (pattern "
                        "detectors only).")


class LLMDataPolicySpec(_Strict):
    hosts: list[Annotated[str, Field(min_length=1, json_schema_extra={"pattern": HOST_PATTERN})]] | None = Field(
        default=None, description="Route or provider hosts it applies to (unset: every route).")
    rules: list[DataRuleSpec] = Field(min_length=1)
    responses: DataResponses | None = None

    @field_validator("hosts")
    @classmethod
    def _hosts_are_names(cls, value: list[str] | None) -> list[str] | None:
        return [_check_host(h) for h in value] if value is not None else None

    @model_validator(mode="after")
    def _unique_rule_names(self) -> LLMDataPolicySpec:
        _check_unique([rule.name for rule in self.rules if rule.name], "rules: rule names must be unique")
        return self


class LLMDataPolicy(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    api_version: Literal["llm-gateway.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LLMDataPolicy"]
    metadata: Metadata
    spec: LLMDataPolicySpec
