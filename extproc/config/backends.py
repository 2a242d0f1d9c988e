"""In-cluster model servers an LLMRoute's `backendRef` names: core Services and the Gateway API
Inference Extension's InferencePools (`inference.networking.k8s.io/v1`), and their ready
endpoints (docs/in-cluster-models.md).

Where the endpoints come from depends on the source, and is worked out here, in pure functions
over the objects as the API server gives them:
- Kubernetes: a Service's from its EndpointSlices (`kubernetes.io/service-name`), the port whose
  name matches the Service port's; an InferencePool's from the pods its `selector` selects in its
  namespace (Ready, with an IP), at its `targetPorts[0]`. Only ready endpoints count.
- Files: the object's `llm-gateway.dev/endpoints` annotation, "host:port" comma-separated (so
  `extproc up` and the demo run with model servers on this machine).

An InferencePool's `endpointPickerRef` is read and not called: this gateway is the endpoint
picker (`extproc.policy.endpoint_picker`), so a pool needs no picker service of its own.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .loader import config_files
from .models import POOL_GROUP

POOL_API_VERSION = f"{POOL_GROUP}/v1"
ENDPOINTS_ANNOTATION = "llm-gateway.dev/endpoints"
SERVICE_NAME_LABEL = "kubernetes.io/service-name"
H2C = ("kubernetes.io/h2c", "h2c", "http2")  # appProtocol values that mean HTTP/2 without TLS

Key = tuple[str, str, str]  # kind, namespace, name


@dataclass(frozen=True)
class Backend:
    """A Service or an InferencePool, as far as routing needs it."""

    kind: str
    namespace: str
    name: str
    # Service: its ports (name, port, appProtocol); InferencePool: its targetPorts (name "", number)
    ports: tuple[tuple[str, int, str], ...]
    app_protocol: str  # an InferencePool's spec.appProtocol ("" where unset)
    selector: tuple[tuple[str, str], ...] | None  # an InferencePool's matchLabels
    picker_ref: str | None  # an InferencePool's endpointPickerRef name (not called: see the module)
    annotated: tuple[str, ...] | None  # the endpoints annotation, where set (files)

    @property
    def key(self) -> Key:
        return (self.kind, self.namespace, self.name)


def backend_of(raw: Mapping[str, Any]) -> Backend | str:
    """A Service or InferencePool object as the API server (or a file) gives it, or what is wrong."""
    kind = raw.get("kind")
    meta = raw.get("metadata") or {}
    spec = raw.get("spec") or {}
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(spec, dict):
        return "metadata.name and spec are required"
    annotations = meta.get("annotations") or {}
    annotated = None
    text = annotations.get(ENDPOINTS_ANNOTATION) if isinstance(annotations, dict) else None
    if isinstance(text, str):
        parsed = parse_endpoints(text)
        if isinstance(parsed, str):
            return f"metadata.annotations[{ENDPOINTS_ANNOTATION}]: {parsed}"
        annotated = parsed
    if kind == "Service":
        ports = []
        for port in spec.get("ports") or []:
            if isinstance(port, dict) and isinstance(port.get("port"), int):
                ports.append((str(port.get("name") or ""), int(port["port"]), str(port.get("appProtocol") or "")))
        return Backend("Service", namespace, name, tuple(ports), "", None, None, annotated)
    if kind == "InferencePool":
        selector = spec.get("selector") or {}
        labels = selector.get("matchLabels") if isinstance(selector, dict) else None
        if not isinstance(labels, dict) or not labels:
            return "spec.selector.matchLabels: an InferencePool selects its pods by labels"
        targets = [p.get("number") for p in spec.get("targetPorts") or [] if isinstance(p, dict)]
        numbers = [n for n in targets if isinstance(n, int) and 1 <= n <= 65535]
        if not targets or len(numbers) != len(targets):
            return "spec.targetPorts: at least one port number (1-65535)"
        picker = spec.get("endpointPickerRef")
        return Backend("InferencePool", namespace, name, tuple(("", n, "") for n in numbers),
                       str(spec.get("appProtocol") or ""), tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                       str(picker.get("name")) if isinstance(picker, dict) and picker.get("name") else None, annotated)
    return f"not a Service or an InferencePool: {kind!r}"


def parse_endpoints(text: str) -> tuple[str, ...] | str:
    """"127.0.0.1:8001, 127.0.0.1:8002" as sorted endpoints, or what is wrong."""
    found = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        host, _, port = item.rpartition(":")
        host = host.strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"{item!r} is not ip:port (an IP address: Envoy connects to it as it is)"
        if not port.isdigit() or not 1 <= int(port) <= 65535:
            return f"{item!r} has no port (1-65535)"
        found.append(_endpoint(host, int(port)))
    return tuple(sorted(set(found)))


def _endpoint(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def service_port(backend: Backend, port: int | None) -> tuple[str, int, str] | str:
    """The Service port a backendRef names (unset: the only one), or what is wrong."""
    if port is None:
        if len(backend.ports) != 1:
            return f"Service {backend.namespace}/{backend.name} has {len(backend.ports)} ports: name one (port)"
        return backend.ports[0]
    for found in backend.ports:
        if found[1] == port:
            return found
    return f"Service {backend.namespace}/{backend.name} has no port {port}"


def slice_endpoints(slices: Iterable[Mapping[str, Any]], port_name: str) -> tuple[str, ...]:
    """The ready endpoints of a Service's EndpointSlices, at the port named as the Service's
    port is (an endpoint whose `ready` condition is unset counts as ready, as kube-proxy does)."""
    found = set()
    for item in slices:
        numbers = [p["port"] for p in item.get("ports") or []
                   if isinstance(p, dict) and (p.get("name") or "") == port_name and isinstance(p.get("port"), int)]
        if not numbers:
            continue
        for endpoint in item.get("endpoints") or []:
            conditions = endpoint.get("conditions") or {}
            if conditions.get("ready") is False or conditions.get("terminating") is True:
                continue
            for address in endpoint.get("addresses") or []:
                found.add(_endpoint(str(address), int(numbers[0])))
    return tuple(sorted(found))


def pod_ready(pod: Mapping[str, Any]) -> str | None:
    """A pod's IP where it is Ready (and not being deleted), else None."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return None
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return str(status["podIP"]) if ready else None


def pool_endpoints(backend: Backend, pods: Iterable[Mapping[str, Any]]) -> tuple[str, ...]:
    """The ready pods an InferencePool selects (its namespace, all its labels), at its first target port."""
    wanted = dict(backend.selector or ())
    port = backend.ports[0][1]
    found = set()
    for pod in pods:
        meta = pod.get("metadata") or {}
        if (meta.get("namespace") or "default") != backend.namespace:
            continue
        labels = meta.get("labels") or {}
        if all(labels.get(k) == v for k, v in wanted.items()):
            ip = pod_ready(pod)
            if ip is not None:
                found.add(_endpoint(ip, port))
    return tuple(sorted(found))


def load_backends(paths: Sequence[str | Path]) -> dict[Key, Backend | str]:
    """The Services and InferencePools in config files (file mode): each by its key, or what is
    wrong with it (reported only where a route names it: a Service may be there for another reason)."""
    found: dict[Key, Backend | str] = {}
    try:
        files = config_files(paths)
    except FileNotFoundError:
        return found
    for file in files:
        try:
            docs = list(yaml.safe_load_all(file.read_text(encoding="utf-8")))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            continue  # the loader reports it
        for doc in docs:
            items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            for item in items if isinstance(items, list) else []:
                if not isinstance(item, dict):
                    continue
                kind, version = item.get("kind"), item.get("apiVersion")
                if (kind, version) not in (("Service", "v1"), ("InferencePool", POOL_API_VERSION)):
                    continue
                meta = item.get("metadata") or {}
                key = (str(kind), str(meta.get("namespace") or "default"), str(meta.get("name") or ""))
                found[key] = backend_of(item)
    return found
