"""The `istio.alibabacloud.com/v1beta1` custom resources, as pydantic models.

The models mirror the fields ASM documents for `LLMProvider` and `LLMRoute`. Unknown
fields under `spec` are errors (they are usually typos); fields ASM defines that this
gateway does not implement yet are accepted and reported through `unimplemented_fields`.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ..policy.capacity import MAX_LIMIT

API_VERSION = "istio.alibabacloud.com/v1beta1"
KINDS = ("LLMProvider", "LLMRoute")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


class SecretKeyRef(_Strict):
    """A key of a Secret in the object's own namespace (our extension to ASM's schema)."""

    name: str = Field(min_length=1)
    key: str = Field(min_length=1)


class OpenAIConfig(_Strict):
    model: str | None = Field(default=None, min_length=1)
    api_key: str | None = Field(default=None, alias="apiKey", min_length=1)
    api_key_secret_ref: SecretKeyRef | None = Field(default=None, alias="apiKeySecretRef")
    stream: bool | None = None
    # Our extension: the model embeddings requests are sent with (replacing the client's);
    # unset, the client's model is kept. `model` stays the chat model.
    embedding_model: str | None = Field(default=None, alias="embeddingModel", min_length=1,
                                        description="Model for embeddings requests (unset: the client's).")

    @model_validator(mode="after")
    def _one_key_source(self) -> OpenAIConfig:
        if self.api_key is not None and self.api_key_secret_ref is not None:
            raise ValueError("set apiKey or apiKeySecretRef, not both")
        return self


class ProviderConfig(_Strict):
    openai_config: OpenAIConfig = Field(alias="openAIConfig")


class ProviderConfigs(_Strict):
    default_config: ProviderConfig = Field(alias="defaultConfig")
    route_specific_configs: dict[str, ProviderConfig] = Field(
        default_factory=dict, alias="routeSpecificConfigs"
    )


HOST_PATTERN = r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$"


DURATION_PATTERN = r"^[0-9]+(ms|s|m|h)$"
# exportTo entries: ".", "*" or a namespace name (a DNS label)
ExportTarget = Annotated[str, Field(pattern=r"^(\.|\*|[a-z0-9]([-a-z0-9]*[a-z0-9])?)$", max_length=63)]


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
    workload_selector: dict[str, Any] | None = Field(default=None, alias="workloadSelector")
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
    source_labels: dict[str, str] | None = Field(default=None, alias="sourceLabels")
    gateways: list[str] | None = None


class BackendRef(_Strict):
    provider_host: str = Field(alias="providerHost", min_length=1)
    weight: int | None = Field(default=None, ge=0)


class FallbackRef(_Strict):
    """Our extension: a provider tried after the rule's own backendRefs (docs/failover.md)."""

    provider_host: str = Field(alias="providerHost", min_length=1)


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
    workload_selector: dict[str, Any] | None = Field(default=None, alias="workloadSelector")
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
        names = [rule.name for rule in self.rules if rule.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rules: rule names must be unique (repeated: {', '.join(dupes)})")
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


def _check_host(value: str) -> str:
    if not _HOST_RE.match(value) or value.replace(".", "").isdigit():
        raise ValueError(f"{value!r} is not a host name (letters, digits, '-' and '.'; no port, scheme or IP address)")
    return value.lower()


def unimplemented_fields(obj: LLMProvider | LLMRoute | LLMTokenRateLimit) -> list[str]:
    """Paths of fields ASM defines that are accepted but have no effect here yet."""
    if not isinstance(obj, (LLMProvider, LLMRoute)):
        return []
    found = [f"spec.{alias}" for name, alias in (("workload_selector", "workloadSelector"), ("gateways", "gateways"))
             if getattr(obj.spec, name) is not None
             # a route's gateways are served: extproc.policy.gateway_binding
             and not (isinstance(obj, LLMRoute) and name == "gateways")]
    if isinstance(obj, LLMRoute):
        for i, rule in enumerate(obj.spec.rules):
            for j, match in enumerate(rule.matches):
                if match.source_labels is not None:
                    found.append(f"spec.rules[{i}].matches[{j}].sourceLabels")
                if match.gateways is not None:
                    found.append(f"spec.rules[{i}].matches[{j}].gateways")
    return found


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
    header: str = Field(min_length=1, pattern=HEADER_NAME_PATTERN,
                        description="One budget per value of this request header; a request without it shares "
                                    "the \"\" budget.")


class BudgetMatch(_Strict):
    headers: dict[str, StringMatch] = Field(default_factory=dict)


class BudgetRuleSpec(_Strict):
    name: str | None = Field(default=None, min_length=1)
    matches: list[BudgetMatch] = Field(default_factory=list)
    tokens: int = Field(ge=1, description="Total tokens (prompt + completion) per `per`.")
    requests: int | None = Field(default=None, ge=1, description="Requests per `per` (optional).")
    per: str = Field(pattern=PER_PATTERN, description="The period: 1s to 30d, e.g. 1m, 1h, 1d.")

    @field_validator("per")
    @classmethod
    def _per_in_range(cls, value: str) -> str:
        seconds = parse_per(value)
        if not MIN_PER_S <= seconds <= MAX_PER_S:
            raise ValueError(f"per must be between 1s and 30d (got {value})")
        return value

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
        names = [rule.name for rule in self.rules if rule.name]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"rules: rule names must be unique (repeated: {', '.join(dupes)})")
        return self


class LLMTokenRateLimit(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True)
    api_version: Literal["llm-gateway.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["LLMTokenRateLimit"]
    metadata: Metadata
    spec: LLMTokenRateLimitSpec
