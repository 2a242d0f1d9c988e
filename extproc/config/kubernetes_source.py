"""The Kubernetes config source: LLMProvider and LLMRoute objects (and the Secrets they name)
listed and watched through the API server, each object's verdict written to its status.

Unlike files, where any error keeps the whole last good config, here each object stands on
its own: an invalid one is left out (its `Accepted` condition says why) and the rest serve.

Watches run in threads (the official client is synchronous) and only signal the event loop;
the config is rebuilt there, a moment after the last change, so a burst of applies is one
rebuild. A watch keeps its resourceVersion, lists again on 410 Gone, and reconnects with
backoff after any other failure.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from ..policy.addresses import Lookup
from ..policy.gateway_binding import MESH_VIEW, View
from .compile import Compiled, compile_config
from .crds import BUDGET_GROUP, BUDGET_VERSION, GROUP, VERSION
from .kubernetes_backends import BackendWatch
from .loader import Loaded, parse_object
from .problems import Problem

log = logging.getLogger(__name__)

SOURCE_LABEL = "kubernetes"
PLURALS = {"LLMProvider": "llmproviders", "LLMRoute": "llmroutes", "LLMTokenRateLimit": "llmtokenratelimits",
           "LLMPriceTable": "llmpricetables", "LLMDataPolicy": "llmdatapolicies"}
# our own kinds live in our own API group; their CRDs may not be installed (then: none of them)
API_OF = {"LLMTokenRateLimit": (BUDGET_GROUP, BUDGET_VERSION), "LLMPriceTable": (BUDGET_GROUP, BUDGET_VERSION),
          "LLMDataPolicy": (BUDGET_GROUP, BUDGET_VERSION)}
OPTIONAL_KINDS = ("LLMTokenRateLimit", "LLMPriceTable", "LLMDataPolicy")
# kinds whose last accepted version keeps serving while a newer one is invalid: a data policy
# with an error must not leave the prompts it protected unprotected
KEEP_LAST_GOOD = ("LLMDataPolicy",)
ADDRESS_CONDITION = "AddressResolved"  # an LLMProvider's: does its host name resolve (extproc.policy.addresses)
WATCH_TIMEOUT_S = 240
MAX_BACKOFF_S = 30.0

Key = tuple[str, str, str]  # kind, namespace, name


@dataclass
class _Cached:
    raw: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.raw.get("metadata") or {}

    def same_spec(self, other: dict[str, Any]) -> bool:
        other_meta = other.get("metadata") or {}
        return self.raw.get("spec") == other.get("spec") and self.meta.get("generation") == other_meta.get("generation")


class KubernetesSource:
    def __init__(self, apply: Callable[[Compiled], Awaitable[None]], namespace: str | None = None,
                 api_client: Any = None, debounce: float = 0.3, key_env: dict[str, str] | None = None,
                 home: str | None = None, view: View = MESH_VIEW):
        from kubernetes import client, config

        if api_client is None:
            try:
                config.load_incluster_config()
            except config.ConfigException:
                config.load_kube_config()  # KUBECONFIG or ~/.kube/config
            api_client = client.ApiClient()
        self._custom = client.CustomObjectsApi(api_client)
        self._core = client.CoreV1Api(api_client)
        # the Services and InferencePools routes name, and their endpoints (in-cluster model servers)
        self._backends = BackendWatch(api_client, namespace, self._signal)
        self._apply = apply
        self._namespace = namespace
        self._key_env = {name: host.lower() for name, host in (key_env or {}).items()}  # --key-env NAME=HOST
        self._home = home  # the control plane's namespace: its objects are every namespace's by default
        self._debounce = debounce
        self._view = view  # an egress gateway leaves the objects' status to the control plane
        self._lock = threading.Lock()
        self._objects: dict[Key, _Cached] = {}
        self._last_good: dict[Key, dict[str, Any]] = {}  # KEEP_LAST_GOOD kinds: the last accepted version
        self._secrets: dict[tuple[str, str], dict[str, str] | None] = {}  # referenced ones only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._stopping = threading.Event()
        self._versions: dict[str, str] = {}  # resourceVersion of each kind's first list
        self._secret_version = ""
        # replicas: only the elected leader writes status (see extproc.ops.leader); one process always may
        self.may_write_status: Callable[[], bool] = lambda: True
        self._verdicts: dict[Key, tuple[bool, list[Problem]]] = {}  # of the last rebuild
        self._addresses: dict[str, Lookup] = {}  # provider host -> its name's last lookup
        self._status_lock = threading.Lock()
        self._writes: set[asyncio.Future[None]] = set()

    # ------------------------------------------------------------------ lifecycle

    async def load_initial(self) -> Compiled:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        for kind in PLURALS:
            try:
                self._versions[kind] = await asyncio.to_thread(self._list, kind)
            except Exception as exc:
                if kind not in OPTIONAL_KINDS or getattr(exc, "status", None) != 404:
                    raise
                log.warning("no %s CRD in the cluster (kubectl apply -f k8s/crds.yaml): no %s objects until it is "
                            "installed", kind, kind)
                self._versions[kind] = ""
        self._secret_version = await asyncio.to_thread(self._list_secrets_version)
        await asyncio.to_thread(self._backends.list_all)
        return await self._reconcile()

    async def run(self) -> None:
        assert self._changed is not None
        threads = [threading.Thread(target=self._watch_kind, args=(kind,), name=f"watch-{kind}", daemon=True)
                   for kind in PLURALS]
        threads.append(threading.Thread(target=self._watch_secrets, name="watch-secrets", daemon=True))
        for t in threads:
            t.start()
        self._backends.start()
        try:
            while True:
                await self._changed.wait()
                await asyncio.sleep(self._debounce)  # one rebuild for a burst of changes
                self._changed.clear()
                try:
                    await self._reconcile()
                except Exception:
                    log.exception("rebuilding the config from Kubernetes failed; the last config stays in force")
        finally:
            self._stopping.set()
            self._backends.stop()

    def _signal(self) -> None:
        if self._loop is not None and self._changed is not None:
            self._loop.call_soon_threadsafe(self._changed.set)

    # ------------------------------------------------------------------ list and watch

    def _list_call(self, kind: str) -> Callable[..., Any]:
        plural = PLURALS[kind]
        group, version = API_OF.get(kind, (GROUP, VERSION))
        if self._namespace:
            namespace = self._namespace
            return lambda **kw: self._custom.list_namespaced_custom_object(group, version, namespace, plural, **kw)
        return lambda **kw: self._custom.list_cluster_custom_object(group, version, plural, **kw)

    def _list(self, kind: str) -> str:
        result = self._list_call(kind)()
        with self._lock:
            for key in [k for k in self._objects if k[0] == kind]:
                del self._objects[key]
            for item in result.get("items", []):
                item.setdefault("kind", kind)
                item.setdefault("apiVersion", "/".join(API_OF.get(kind, (GROUP, VERSION))))
                self._objects[_key(kind, item)] = _Cached(item)
        return str((result.get("metadata") or {}).get("resourceVersion", ""))

    def _watch_kind(self, kind: str) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version: str | None = self._versions[kind]
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list(kind)
                    self._signal()
                w = watch.Watch()
                for event in w.stream(self._list_call(kind), resource_version=version, timeout_seconds=WATCH_TIMEOUT_S,
                                      allow_watch_bookmarks=True):
                    kind_of_event, obj = event["type"], event["object"]
                    if kind_of_event == "ERROR":
                        if (obj or {}).get("code") == 410:
                            raise _Gone()
                        raise RuntimeError(f"watch error: {obj}")
                    version = (obj.get("metadata") or {}).get("resourceVersion", version)
                    if kind_of_event != "BOOKMARK":
                        self._on_object(kind, kind_of_event, obj)
                backoff = 0.5
            except _Gone:
                log.info("watch of %s expired (410 Gone): listing again", PLURALS[kind])
                version = None
            except ApiException as exc:
                if exc.status == 410:
                    log.info("watch of %s expired (410 Gone): listing again", PLURALS[kind])
                    version = None
                    continue
                backoff = self._back_off(f"watch of {PLURALS[kind]}", exc, backoff)
                version = None
            except Exception as exc:  # connection refused, API server restarting, ...
                backoff = self._back_off(f"watch of {PLURALS[kind]}", exc, backoff)
                version = None

    def _back_off(self, what: str, exc: Exception, backoff: float) -> float:
        log.warning("%s failed (%s); retrying in %.1fs", what, _short(exc), backoff)
        self._stopping.wait(backoff)
        return min(backoff * 2, MAX_BACKOFF_S)

    def _on_object(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        obj.setdefault("kind", kind)
        obj.setdefault("apiVersion", "/".join(API_OF.get(kind, (GROUP, VERSION))))
        key = _key(kind, obj)
        with self._lock:
            before = self._objects.get(key)
            if event == "DELETED":
                self._objects.pop(key, None)
                changed = before is not None
            else:
                self._objects[key] = _Cached(obj)
                changed = before is None or not before.same_spec(obj)  # a status write alone changes nothing
        if changed:
            self._signal()

    def _secret_list_call(self) -> Callable[..., Any]:
        if self._namespace:
            return lambda **kw: self._core.list_namespaced_secret(self._namespace, **kw)
        return lambda **kw: self._core.list_secret_for_all_namespaces(**kw)

    def _list_secrets_version(self) -> str:
        # Only the version: the data of Secrets nobody references is never kept.
        result = self._secret_list_call()(limit=1)
        return result.metadata.resource_version or ""

    def _watch_secrets(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        version: str | None = self._secret_version
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    version = self._list_secrets_version()
                    with self._lock:
                        self._secrets.clear()  # read again on the next rebuild
                    self._signal()
                w = watch.Watch()
                # the client's own list method, not a wrapper: the client reads from its docstring
                # what to make of each event (V1Secret); given a wrapper it hands out dicts instead
                method, args = ((self._core.list_namespaced_secret, (self._namespace,)) if self._namespace
                                else (self._core.list_secret_for_all_namespaces, ()))
                for event in w.stream(method, *args, resource_version=version,
                                      timeout_seconds=WATCH_TIMEOUT_S, allow_watch_bookmarks=True):
                    obj = event["object"]
                    if event["type"] == "ERROR":
                        raise _Gone()
                    if event["type"] == "BOOKMARK":  # a dict with only a resourceVersion (the client's form)
                        version = ((obj or {}).get("metadata") or {}).get("resourceVersion") or version
                        continue
                    version = obj.metadata.resource_version or version
                    ref = (obj.metadata.namespace, obj.metadata.name)
                    with self._lock:
                        referenced = ref in self._secrets
                        if referenced:
                            self._secrets[ref] = None if event["type"] == "DELETED" else _decode(obj.data)
                    if referenced:
                        self._signal()
                backoff = 0.5
            except _Gone:
                version = None
            except ApiException as exc:
                if exc.status != 410:
                    backoff = self._back_off("watch of secrets", exc, backoff)
                version = None
            except Exception as exc:
                backoff = self._back_off("watch of secrets", exc, backoff)
                version = None

    def _secret(self, namespace: str, name: str, key: str) -> str | None:
        """A Secret's key, for the loader. Read once when first referenced, then kept by the watch."""
        from kubernetes.client.exceptions import ApiException

        ref = (namespace, name)
        with self._lock:
            known = ref in self._secrets
            data = self._secrets.get(ref)
        if not known:
            try:
                data = _decode(self._core.read_namespaced_secret(name, namespace).data)
            except ApiException as exc:
                if exc.status not in (403, 404):
                    raise
                data = None
            with self._lock:
                self._secrets[ref] = data
        return (data or {}).get(key)

    # ------------------------------------------------------------------ rebuild and status

    async def _reconcile(self) -> Compiled:
        compiled, verdicts = await asyncio.to_thread(self._compile)
        self._verdicts = verdicts
        await self._apply(compiled)
        if self._view.is_mesh and self.may_write_status():  # a gateway leaves status to the control plane
            await asyncio.to_thread(self._write_statuses, verdicts)
        return compiled

    def refresh(self) -> None:
        """Rebuild soon (and write every status that is not as it should be): a new leader's first act."""
        self._signal()

    def _compile(self) -> tuple[Compiled, dict[Key, tuple[bool, list[Problem]]]]:
        with self._lock:
            snapshot = {k: v.raw for k, v in self._objects.items()}
        environ = dict(os.environ)
        loaded: list[Loaded] = []
        problems: dict[Key, list[Problem]] = {k: [] for k in snapshot}
        stale: set[Key] = set()  # invalid now, served as last accepted
        for key, raw in sorted(snapshot.items(), key=lambda kv: _creation_order(kv[1])):
            obj, obj_problems = parse_object(raw, SOURCE_LABEL, key[2], environ, self._secret, self._key_env)
            problems[key].extend(obj_problems)
            last = self._last_good.get(key)
            if obj is None and last is not None:
                obj, _ = parse_object(last, SOURCE_LABEL, key[2], environ, self._secret, self._key_env)
                if obj is not None:
                    stale.add(key)
                    generation = (last.get("metadata") or {}).get("generation")
                    problems[key].append(Problem(
                        f"this version is not served: the last accepted one (generation {generation}) stays in force "
                        "until the errors are fixed", obj=f"{key[0]} {key[1]}/{key[2]}", reason="LastGoodKept"))
            if obj is not None:
                loaded.append(obj)
        backends, endpoints = self._backends.snapshot(raw for key, raw in snapshot.items() if key[0] == "LLMRoute")
        compiled = compile_config(loaded, self._view, namespaces=True, home=self._home, backends=backends,
                                  endpoints=endpoints)
        by_label = {f"{k[0]} {k[1]}/{k[2]}": k for k in snapshot}
        for problem in compiled.problems:
            if problem.obj in by_label:
                problems[by_label[problem.obj]].append(problem)
        accepted = {obj.key for obj in compiled.accepted}
        for key in [k for k in self._last_good if k not in snapshot]:
            del self._last_good[key]  # deleted: nothing of it stays
        for key in accepted - stale:
            if key[0] in KEEP_LAST_GOOD:
                self._last_good[key] = snapshot[key]
        verdicts: dict[Key, tuple[bool, list[Problem]]] = {}
        for key, found in problems.items():
            ok = key in accepted and key not in stale
            kept = [p for p in found if (p.severity == "warning") == ok]  # warnings if served, errors if not
            for problem in kept:
                log.log(logging.WARNING if ok else logging.ERROR, "%s", problem)
            verdicts[key] = (ok, kept)
        return compiled, verdicts

    def addresses_changed(self, lookups: dict[str, Lookup]) -> None:
        """Whether each provider's host name resolves (`extproc.policy.addresses`), told by the
        control plane when one changes: written as the LLMProviders' `AddressResolved` condition."""
        self._addresses = dict(lookups)
        if self._view.is_mesh and self.may_write_status() and self._verdicts:
            task = asyncio.ensure_future(asyncio.to_thread(self._write_statuses, self._verdicts))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    def _write_statuses(self, verdicts: dict[Key, tuple[bool, list[Problem]]]) -> None:
        """Each object's `Accepted` condition (and an LLMProvider's `AddressResolved`), written
        only when one changed."""
        from kubernetes.client.exceptions import ApiException

        with self._lock:
            snapshot = {k: v.raw for k, v in self._objects.items()}
        with self._status_lock:  # a rebuild and an address change may both write
            for key, (accepted, found) in verdicts.items():
                raw = snapshot.get(key)
                if raw is None:
                    continue
                generation = (raw.get("metadata") or {}).get("generation")
                wanted = [_accepted_condition(accepted, found)]
                if key[0] == "LLMProvider" and accepted:
                    host = str((raw.get("spec") or {}).get("host", "")).lower()
                    lookup = self._addresses.get(host)
                    if lookup is not None:
                        wanted.append(_address_condition(host, lookup))
                conditions = (raw.get("status") or {}).get("conditions") or []
                current = {c.get("type"): c for c in conditions}
                written = []
                for condition in wanted:
                    condition["observedGeneration"] = generation
                    before = current.get(condition["type"])
                    same = before is not None and before.get("status") == condition["status"]
                    condition["lastTransitionTime"] = (before or {}).get("lastTransitionTime") if same else _now()
                    written.append(condition)
                if all(current.get(c["type"]) is not None and all(current[c["type"]].get(k) == v
                                                                  for k, v in c.items() if k != "lastTransitionTime")
                       for c in written) and len(written) == len(conditions):
                    continue
                kind, namespace, name = key
                try:
                    self._custom.patch_namespaced_custom_object_status(
                        *API_OF.get(kind, (GROUP, VERSION)), namespace, PLURALS[kind], name,
                        {"status": {"conditions": written}})
                    raw.setdefault("status", {})["conditions"] = written  # as written, until the watch says
                    log.info("status of %s %s/%s: %s", kind, namespace, name,
                             ", ".join(f"{c['type']}={c['status']}" for c in written))
                except ApiException as exc:
                    if exc.status != 404:  # deleted meanwhile
                        log.warning("cannot write the status of %s %s/%s: %s", kind, namespace, name, _short(exc))


def _accepted_condition(accepted: bool, found: list[Problem]) -> dict[str, Any]:
    if accepted:
        reason = "Accepted"
        message = "served by the gateway"
        if found:
            message += "; " + "; ".join(f"{p.field}: {p.message}" for p in found)
    else:
        reason = found[0].reason if found else "Invalid"
        message = "; ".join(f"{p.field}: {p.message}" if p.field else p.message for p in found) or "not served"
    return {"type": "Accepted", "status": "True" if accepted else "False", "reason": reason,
            "message": message[:1000]}


def _address_condition(host: str, lookup: Lookup) -> dict[str, Any]:
    """`AddressResolved`: whether the provider's host name resolves, as the gateway last found.
    No addresses in the message: a name's addresses may change at every lookup, the verdict not."""
    if lookup.resolved:
        message = f"{host} resolves"
    else:
        message = (f"{lookup.describe(host)}: its requests get a 503 provider_address_unknown, and failover "
                   "skips it, until it resolves")
    return {"type": ADDRESS_CONDITION, "status": "True" if lookup.resolved else "False",
            "reason": lookup.resolution.value, "message": message[:1000]}


class _Gone(Exception):
    pass


def _key(kind: str, obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (kind, meta.get("namespace") or "default", meta.get("name") or "")


def _creation_order(raw: dict[str, Any]) -> tuple[str, str]:
    meta = raw.get("metadata") or {}
    return (meta.get("creationTimestamp") or "", meta.get("name") or "")


def _decode(data: dict[str, str] | None) -> dict[str, str]:
    out = {}
    for k, v in (data or {}).items():
        try:
            out[k] = base64.b64decode(v).decode("utf-8").strip()
        except (ValueError, UnicodeDecodeError):
            continue
    return out


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    reason = getattr(exc, "reason", None)
    return f"{status} {reason}" if status else f"{type(exc).__name__}: {exc}"[:200]

