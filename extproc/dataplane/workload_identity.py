"""Who a Kubernetes caller is beyond its ServiceAccount: the pod its token is bound to, that
pod's labels, and its workload.

A token the kubelet projects into a pod is bound to that pod: the TokenReview that checks it
(`extproc.dataplane.authentication`) also returns the pod's name and UID. The pods themselves
come from the API server: listed and watched (read-only: `get`, `list`, `watch` on pods; their
owners are read from the pod's own owner references, so nothing on ReplicaSets or Jobs), so a
label change applies to the next request without a restart. A pod not seen yet (just created)
is read once, off the event loop, while its connection waits, as a new token is reviewed.

What is known may go out of date: the pod is deleted while its Envoy still holds a reviewed
token, or the API server cannot be reached. Then the last known labels are used for a bounded
time (`grace_s`, `--identity-grace`), and after that the caller's labels are unknown: a
decision that depends on them answers 503 (`extproc.policy.caller_view`), never another
caller's routes. Its namespace and ServiceAccount, which the token itself proves, still count.

The watch runs in a thread (the official client is synchronous) and replaces records whole, so
a request reads them without a lock: a stream costs one dictionary lookup here.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..policy.caller import Caller, Labels, labels_of, workload_of

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 30.0
FORGET_AFTER_S = 600.0  # a gone pod's record, kept to answer its stale tokens without asking again
WATCH_TIMEOUT_S = 240
MAX_BACKOFF_S = 30.0


@dataclass
class PodRecord:
    """What is known of one pod: its labels and workload as last seen, and since when it is gone
    (None: it exists). The callers made from it are kept, one per ServiceAccount (the same
    object for every stream, so what is worked out per caller is worked out once)."""

    namespace: str
    name: str
    uid: str
    labels: Labels
    workload: str
    version: str = ""  # resourceVersion
    gone_at: float | None = None
    _callers: dict[tuple[str, bool], Caller] = field(default_factory=dict, repr=False)

    def caller(self, account: str, known: bool) -> Caller:
        """The caller this pod is for a token of `account`: with its labels, or (`known` False)
        with labels unknown and no workload, once what is known is too old to decide by."""
        key = (account, known)
        made = self._callers.get(key)
        if made is None:
            made = self._callers[key] = Caller(self.namespace, account, self.name,
                                               self.labels if known else None, self.workload if known else None,
                                               self.uid)
        return made


def record_of(pod: Any) -> PodRecord:
    """A record from a pod as the official client gives it (`V1Pod`)."""
    meta = pod.metadata
    labels = dict(meta.labels or {})
    owners = [(ref.kind, ref.name, bool(ref.controller)) for ref in (meta.owner_references or [])]
    return PodRecord(meta.namespace, meta.name, meta.uid, labels_of(labels), workload_of(meta.name, labels, owners),
                     meta.resource_version or "")


class PodDirectory:
    """The pods callers' tokens are bound to, kept current by a watch (see the module's docstring).

    `list_pods()` -> (pods, resourceVersion); `watch_pods(resourceVersion)` -> an iterator of
    (event type, pod), ending when the watch times out; `read_pod(namespace, name)` -> a pod or
    None. With `start()`, a thread lists and watches; without (tests), records come from `apply`."""

    def __init__(self, list_pods: Callable[[], tuple[Iterable[Any], str]] | None = None,
                 watch_pods: Callable[[str], Iterable[tuple[str, Any]]] | None = None,
                 read_pod: Callable[[str, str], Any] | None = None, grace_s: float = DEFAULT_GRACE_S,
                 clock: Callable[[], float] = time.time):
        self._list, self._watch, self._read = list_pods, watch_pods, read_pod
        self.grace_s = grace_s
        self._clock = clock
        self._by_uid: dict[str, PodRecord] = {}
        self.lost_since: float | None = None  # the API server out of reach since then (None: in contact)
        self.listed = threading.Event()  # the first list is in: every pod there was is known
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the request path ------------------------------------------------------------------

    def caller(self, namespace: str, account: str, pod: str, uid: str, now: float) -> Caller | None:
        """The caller for a reviewed token bound to pod (`namespace`/`pod`, `uid`), of ServiceAccount
        `account`: with the pod's labels while they may be decided by; None when this pod was
        never seen (ask `fetch` first)."""
        record = self._by_uid.get(uid)
        if record is None:
            return None
        return record.caller(account, self.fresh(record, now))

    def fresh(self, record: PodRecord, now: float) -> bool:
        """Whether a record may still be decided by: its pod exists (or went less than `grace_s`
        ago), and the API server was in reach less than `grace_s` ago."""
        if record.gone_at is not None and now - record.gone_at > self.grace_s:
            return False
        lost = self.lost_since
        return lost is None or now - lost <= self.grace_s

    # -- off the request path --------------------------------------------------------------

    def fetch(self, namespace: str, name: str, uid: str) -> None:
        """Reads a pod not seen yet (blocking: call it in a thread). A pod that is not there, has
        another UID, or cannot be read is recorded as gone: its caller's labels are unknown."""
        if uid in self._by_uid:
            return
        pod = None
        if self._read is not None:
            try:
                pod = self._read(namespace, name)
            except Exception as exc:  # the API server out of reach: fail closed for this pod, for now
                log.warning("cannot read pod %s/%s: %s", namespace, name, _short(exc))
        record = record_of(pod) if pod is not None else None
        if record is None or record.uid != uid:
            record = PodRecord(namespace, name, uid, frozenset(), "", gone_at=self._clock() - self.grace_s - 1)
        self._by_uid.setdefault(uid, record)

    def apply(self, event: str, record: PodRecord) -> None:
        """One watch event: ADDED and MODIFIED replace the pod's record (so its callers are new
        objects, with the new labels); DELETED marks it gone from now."""
        if event == "DELETED":
            known = self._by_uid.get(record.uid)
            if known is not None and known.gone_at is None:
                gone = PodRecord(known.namespace, known.name, known.uid, known.labels, known.workload, known.version,
                                 gone_at=self._clock())
                self._by_uid[record.uid] = gone
            return
        current = self._by_uid.get(record.uid)
        if current is not None and current.gone_at is None and (current.labels, current.workload) == (
                record.labels, record.workload):
            return  # nothing a decision reads changed: keep the callers made so far
        self._by_uid[record.uid] = record

    def replace_all(self, records: Iterable[PodRecord]) -> None:
        """A new list: every pod in it as listed; a pod known before and missing now is gone."""
        now = self._clock()
        listed = {r.uid: r for r in records}
        merged: dict[str, PodRecord] = {}
        for uid, old in self._by_uid.items():
            if uid in listed:
                continue
            if old.gone_at is None:
                merged[uid] = PodRecord(old.namespace, old.name, uid, old.labels, old.workload, old.version,
                                        gone_at=now)
            elif now - old.gone_at < FORGET_AFTER_S:
                merged[uid] = old
        for uid, new in listed.items():
            before = self._by_uid.get(uid)
            same = before is not None and before.gone_at is None and (before.labels, before.workload) == (
                new.labels, new.workload)
            merged[uid] = before if same and before is not None else new  # unchanged: keep the callers made so far
        self._by_uid = merged  # whole: a reader sees the old dict or the new one

    # -- the watch -------------------------------------------------------------------------

    def start(self) -> None:
        if self._list is None or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="watch-pods", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()

    def _run(self) -> None:
        assert self._list is not None and self._watch is not None
        version: str | None = None
        backoff = 0.5
        while not self._stopping.is_set():
            try:
                if version is None:
                    pods, version = self._list()
                    self.replace_all(record_of(pod) for pod in pods)
                    self.lost_since = None
                    self.listed.set()
                for event, pod in self._watch(version):
                    if event == "ERROR":
                        version = None  # 410 Gone and the like: list again
                        break
                    if event == "BOOKMARK":  # only a resourceVersion; the client leaves it a dict
                        version = bookmark_version(pod) or version
                        continue
                    record = record_of(pod)
                    version = record.version or version
                    self.apply(event, record)
                backoff = 0.5
            except Exception as exc:  # the API server out of reach, or restarting
                if self.lost_since is None:
                    self.lost_since = self._clock()
                    log.warning("watch of pods failed (%s): callers keep their last known labels for %.0fs",
                                _short(exc), self.grace_s)
                version = None
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S)


def bookmark_version(obj: Any) -> str | None:
    """A BOOKMARK event's resourceVersion. The official client does not deserialize bookmarks (its
    object stays the API's JSON, a dict, whatever the watched kind): read as a typed object, it
    failed the watch at every bookmark, and every caller's labels went unknown after the grace."""
    if isinstance(obj, dict):
        version = (obj.get("metadata") or {}).get("resourceVersion")
    else:
        version = getattr(getattr(obj, "metadata", None), "resource_version", None)
    return version if isinstance(version, str) and version else None


def kubernetes_pods(api_client: Any, grace_s: float = DEFAULT_GRACE_S, namespace: str | None = None) -> PodDirectory:
    """A directory of pods read with the official client (in one namespace, or all)."""
    from kubernetes import client, watch
    from kubernetes.client.exceptions import ApiException

    core = client.CoreV1Api(api_client)

    def list_call(**kw: Any) -> Any:
        if namespace:
            return core.list_namespaced_pod(namespace, **kw)
        return core.list_pod_for_all_namespaces(**kw)

    def list_pods() -> tuple[list[Any], str]:
        result = list_call(_request_timeout=30)
        return list(result.items or []), result.metadata.resource_version or ""

    def watch_pods(version: str) -> Iterable[tuple[str, Any]]:
        # the client's own list method, not a wrapper: the client reads from its docstring what to
        # make of each event (V1Pod); given a wrapper it hands out the API's JSON as dicts instead
        method, args = (core.list_namespaced_pod, (namespace,)) if namespace else (core.list_pod_for_all_namespaces, ())
        try:
            for event in watch.Watch().stream(method, *args, resource_version=version, timeout_seconds=WATCH_TIMEOUT_S,
                                              allow_watch_bookmarks=True):
                yield event["type"], event["object"]
        except ApiException as exc:
            if exc.status != 410:
                raise
            yield "ERROR", None

    def read_pod(ns: str, name: str) -> Any:
        try:
            return core.read_namespaced_pod(name, ns, _request_timeout=10)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    return PodDirectory(list_pods, watch_pods, read_pod, grace_s)


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return f"{status} {getattr(exc, 'reason', '')}" if status else f"{type(exc).__name__}: {exc}"[:200]


def pod_reference(extra: Mapping[str, Any]) -> tuple[str, str] | None:
    """(pod name, pod UID) from a TokenReview's `user.extra`, for a token bound to a pod."""
    names = list(extra.get("authentication.kubernetes.io/pod-name") or ())
    uids = list(extra.get("authentication.kubernetes.io/pod-uid") or ())
    if len(names) == 1 and len(uids) == 1 and names[0] and uids[0]:
        return str(names[0]), str(uids[0])
    return None
