"""The Kubernetes side of in-cluster model servers: the Services and InferencePools LLMRoutes
name, and their ready endpoints, listed and watched (docs/in-cluster-models.md).

Four kinds are watched, read-only: Services and pods (core), EndpointSlices (discovery.k8s.io,
v1, or v1beta1 on an API server before 1.21), InferencePools (inference.networking.k8s.io/v1,
whose CRD may be absent: then there are none, until it is installed). A kind the gateway may
not read (RBAC) or that the API server does not serve is said once and left out; the gateway
keeps serving everything else. Only what a route names matters: a change to any other object
does not rebuild the config (a cluster's pods change all day). Pods are kept as little as the
selectors need (labels, IP, readiness).

Watches run in threads, as the LLM objects' do (`extproc.config.kubernetes_source`), and signal
a rebuild; the endpoints are worked out from the objects at each rebuild, by the pure functions
of `extproc.config.backends`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .backends import SERVICE_NAME_LABEL, Backend, Key, backend_of, pool_endpoints, slice_endpoints
from .models import POOL_GROUP

log = logging.getLogger(__name__)

WATCH_TIMEOUT_S = 240
MAX_BACKOFF_S = 30.0
RETRY_UNAVAILABLE_S = 60.0  # a kind that could not be read (RBAC, no CRD) is asked again this often
KINDS = ("InferencePool", "Service", "EndpointSlice", "Pod")


class BackendWatch:
    def __init__(self, api_client: Any, namespace: str | None, changed: Callable[[], None]):
        from kubernetes import client

        self._client = api_client
        self._core = client.CoreV1Api(api_client)
        self._custom = client.CustomObjectsApi(api_client)
        self._namespace = namespace
        self._changed = changed
        self._lock = threading.Lock()
        self._objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {kind: {} for kind in KINDS}
        self._versions: dict[str, str | None] = {}
        self._slice_version = "v1"
        self._stopping = threading.Event()
        # what the routes name: (kind, namespace, name) -> Service port (None: its only one)
        self._referenced: dict[Key, int | None] = {}

    # ------------------------------------------------------------------ listing and watching

    def _list_call(self, kind: str) -> Callable[..., Any]:
        ns = self._namespace
        if kind == "InferencePool":
            if ns:
                return lambda **kw: self._custom.list_namespaced_custom_object(POOL_GROUP, "v1", ns, "inferencepools",
                                                                               **kw)
            return lambda **kw: self._custom.list_cluster_custom_object(POOL_GROUP, "v1", "inferencepools", **kw)
        if kind == "EndpointSlice":
            version = self._slice_version
            if ns:
                return lambda **kw: self._custom.list_namespaced_custom_object("discovery.k8s.io", version, ns,
                                                                               "endpointslices", **kw)
            return lambda **kw: self._custom.list_cluster_custom_object("discovery.k8s.io", version, "endpointslices",
                                                                        **kw)
        if kind == "Service":
            return (lambda **kw: self._core.list_namespaced_service(ns, **kw)) if ns else \
                self._core.list_service_for_all_namespaces
        return (lambda **kw: self._core.list_namespaced_pod(ns, **kw)) if ns else self._core.list_pod_for_all_namespaces

    def _raw(self, kind: str, obj: Any) -> dict[str, Any]:
        raw = obj if isinstance(obj, dict) else self._client.sanitize_for_serialization(obj)
        if kind == "Pod":  # only what a selector and readiness need
            meta, status = raw.get("metadata") or {}, raw.get("status") or {}
            kept = ("name", "namespace", "labels", "deletionTimestamp", "resourceVersion")  # the version: to resume
            raw = {"metadata": {k: meta.get(k) for k in kept},
                   "status": {"podIP": status.get("podIP"), "conditions": [
                       {"type": c.get("type"), "status": c.get("status")} for c in status.get("conditions") or []]}}
        raw.setdefault("kind", kind)
        return raw

    def list_all(self) -> None:
        """The first list of each kind (blocking). A kind that cannot be read is said and skipped."""
        for kind in KINDS:
            self._versions[kind] = self._list(kind)

    def _list(self, kind: str) -> str | None:
        from kubernetes.client.exceptions import ApiException

        try:
            result = self._list_call(kind)()
        except ApiException as exc:
            if kind == "EndpointSlice" and exc.status == 404 and self._slice_version == "v1":
                self._slice_version = "v1beta1"  # an API server before 1.21
                return self._list(kind)
            if exc.status in (403, 404):
                why = "no InferencePool CRD in the cluster" if kind == "InferencePool" and exc.status == 404 \
                    else f"{kind} objects cannot be read ({exc.status} {exc.reason})"
                log.warning("%s: routes naming one get no endpoints from it (asked again every %.0fs)", why,
                            RETRY_UNAVAILABLE_S)
                return None
            raise
        items = result.get("items", []) if isinstance(result, dict) else result.items
        version = (result.get("metadata") or {}).get("resourceVersion", "") if isinstance(result, dict) \
            else result.metadata.resource_version
        fresh = {}
        for item in items:
            raw = self._raw(kind, item)
            meta = raw.get("metadata") or {}
            fresh[(meta.get("namespace") or "default", meta.get("name") or "")] = raw
        with self._lock:
            self._objects[kind] = fresh
        return str(version or "")

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._watch, args=(kind,), name=f"watch-{kind}", daemon=True)
                   for kind in KINDS]
        for thread in threads:
            thread.start()
        return threads

    def stop(self) -> None:
        self._stopping.set()

    def _watch(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version = self._versions.get(kind)
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list(kind)
                    if version is None:  # not readable (yet)
                        self._stopping.wait(RETRY_UNAVAILABLE_S)
                        continue
                    self._changed()
                for event in watch.Watch().stream(self._list_call(kind), resource_version=version,
                                                  timeout_seconds=WATCH_TIMEOUT_S, allow_watch_bookmarks=True):
                    kind_of_event, obj = event["type"], event["object"]
                    if kind_of_event == "ERROR":
                        raise RuntimeError(f"watch error: {obj}")
                    raw = self._raw(kind, obj)
                    version = (raw.get("metadata") or {}).get("resourceVersion") or version
                    if kind_of_event != "BOOKMARK":
                        self._on_object(kind, kind_of_event, raw)
                backoff = 0.5
            except ApiException as exc:
                version = None
                if exc.status != 410:
                    backoff = self._back_off(kind, exc, backoff)
            except Exception as exc:  # connection refused, API server restarting, 410 as an event, ...
                version = None
                backoff = self._back_off(kind, exc, backoff)

    def _back_off(self, kind: str, exc: Exception, backoff: float) -> float:
        log.warning("watch of %s failed (%s); retrying in %.1fs", kind, str(exc).splitlines()[0][:200], backoff)
        self._stopping.wait(backoff)
        return min(backoff * 2, MAX_BACKOFF_S)

    def _on_object(self, kind: str, event: str, raw: dict[str, Any]) -> None:
        meta = raw.get("metadata") or {}
        key = (meta.get("namespace") or "default", meta.get("name") or "")
        with self._lock:
            before = self._objects[kind].get(key)
            if event == "DELETED":
                self._objects[kind].pop(key, None)
            else:
                self._objects[kind][key] = raw
            relevant = self._relevant(kind, before) or self._relevant(kind, raw if event != "DELETED" else None)
        if relevant:
            self._changed()

    def _relevant(self, kind: str, raw: Mapping[str, Any] | None) -> bool:
        """Whether an object is one a route names, or gives endpoints to one (under the lock)."""
        if raw is None:
            return False
        meta = raw.get("metadata") or {}
        namespace, name = meta.get("namespace") or "default", meta.get("name") or ""
        if kind in ("Service", "InferencePool"):
            return (kind, namespace, name) in self._referenced
        if kind == "EndpointSlice":
            owner = (meta.get("labels") or {}).get(SERVICE_NAME_LABEL)
            return ("Service", namespace, owner) in self._referenced
        labels = meta.get("labels") or {}
        for (ref_kind, ref_ns, ref_name) in self._referenced:
            if ref_kind != "InferencePool" or ref_ns != namespace:
                continue
            pool = self._objects["InferencePool"].get((ref_ns, ref_name))
            selector = ((pool or {}).get("spec") or {}).get("selector") or {}
            wanted = selector.get("matchLabels") or {}
            if wanted and all(labels.get(k) == v for k, v in wanted.items()):
                return True
        return False

    # ------------------------------------------------------------------ for a rebuild

    def snapshot(self, routes: Iterable[Mapping[str, Any]]
                 ) -> tuple[dict[Key, Backend | str], dict[Key, tuple[str, ...]]]:
        """The Services and InferencePools the routes (raw LLMRoute objects) name, and their ready
        endpoints; remembered, so that only changes to them rebuild the config."""
        referenced: dict[Key, int | None] = {}
        for route in routes:
            namespace = (route.get("metadata") or {}).get("namespace") or "default"
            for rule in (route.get("spec") or {}).get("rules") or []:
                if not isinstance(rule, dict):
                    continue
                for ref in [*(rule.get("backendRefs") or []), *(rule.get("fallbackRefs") or [])]:
                    target = ref.get("backendRef") if isinstance(ref, dict) else None
                    if isinstance(target, dict) and isinstance(target.get("name"), str):
                        key = (str(target.get("kind") or "Service"), namespace, target["name"])
                        port = target.get("port")
                        referenced.setdefault(key, port if isinstance(port, int) else None)
        backends: dict[Key, Backend | str] = {}
        endpoints: dict[Key, tuple[str, ...]] = {}
        with self._lock:
            self._referenced = referenced
            for key, port in referenced.items():
                kind, namespace, name = key
                raw = self._objects.get(kind, {}).get((namespace, name))
                if raw is None:
                    continue
                backend = backend_of({**raw, "kind": kind, "metadata": {**(raw.get("metadata") or {}),
                                                                        "annotations": {}}})
                backends[key] = backend
                if isinstance(backend, str):
                    continue
                if kind == "InferencePool":
                    endpoints[key] = pool_endpoints(backend, (p for (ns, _), p in self._objects["Pod"].items()
                                                              if ns == namespace))
                else:
                    named = [p for p in backend.ports if port is None or p[1] == port]
                    slices = [s for (ns, _), s in self._objects["EndpointSlice"].items()
                              if ns == namespace and ((s.get("metadata") or {}).get("labels") or {}).get(
                                  SERVICE_NAME_LABEL) == name]
                    endpoints[key] = slice_endpoints(slices, named[0][0]) if len(named) == 1 else ()
        return backends, endpoints
