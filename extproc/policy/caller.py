"""Who is calling: the verified caller a decision is taken for.

A caller is proven by the Envoy's credentials on its control-plane connection, never by
anything the application sends (see `extproc.dataplane.authentication`):

- in Kubernetes, the Envoy's projected ServiceAccount token, checked with a TokenReview: the
  namespace and ServiceAccount, and for a token the kubelet bound to a pod, the pod's name and
  UID; the pod's labels and its workload (the Deployment, StatefulSet, Job ... that owns it) come
  from the API server (`extproc.dataplane.workload_identity`);
- in local mode (`extproc up`, `serve` on Unix sockets or with a static token), the operator
  states it: `--source-namespace NS --source-labels k=v,...` (`LOCAL` when not stated).

A caller is resolved once per Envoy connection and token, and kept: every request of that
Envoy reuses the same object, and what is worked out for it once per routing table (the
routes it sees, `extproc.policy.caller_view`) is kept on it (`memo`).

At an egress gateway the caller is the workload its client certificate names, per request
(`extproc.policy.peer_identity`, `extproc.dataplane.peer_callers`): a `Caller` like any other,
and everything below applies to it unchanged.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

Labels = frozenset[tuple[str, str]]  # a pod's labels as (key, value) pairs: a selector holds if it is a subset
NO_LABELS: Labels = frozenset()


@dataclass(frozen=True, slots=True)
class Caller:
    """A verified caller.

    `namespace` None: the gateway's own Envoy in local mode without `--source-namespace` (or a
    static token), which may use every object. `labels` None: the caller's pod is known but its
    labels are not (not seen yet, gone, or the API server unreachable for too long): a decision
    that depends on them fails closed (`extproc.policy.caller_view`). A caller without a pod (a
    token not bound to one) has no labels: `NO_LABELS`."""

    namespace: str | None
    name: str  # the ServiceAccount ("local" in local mode)
    pod: str | None = None  # the pod's name: for the access log only, never a metric label
    labels: Labels | None = NO_LABELS
    workload: str | None = None  # the owning Deployment/StatefulSet/...'s name, or the pod's own; bounded
    uid: str | None = None  # the pod's UID (with `pod`): what its workload certificate is bound to
    # per routing table: the routes this caller sees, and the like (see `extproc.policy.caller_view`)
    memo: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def labels_known(self) -> bool:
        return self.labels is not None

    def label_dict(self) -> dict[str, str]:
        return dict(self.labels or ())


LOCAL = Caller(None, "local")


def local_caller(namespace: str | None = None, labels: Mapping[str, str] | None = None) -> Caller:
    """The caller of local mode, as the operator states it (`--source-namespace`, `--source-labels`)."""
    if namespace is None and not labels:
        return LOCAL
    return Caller(namespace, "local", labels=labels_of(labels or {}))


def labels_of(labels: Mapping[str, str]) -> Labels:
    return frozenset(labels.items())


def selects(selector: Labels, labels: Labels) -> bool:
    """A label selector (Istio's `sourceLabels`, `workloadSelector`) holds when the labels
    include every pair it names; an empty one holds for everyone."""
    return selector <= labels


# Kubernetes label syntax: a key is an optional DNS-subdomain prefix and '/', then a name of at
# most 63 characters; a value is at most 63 characters, possibly empty.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE_PATTERN = _LABEL_VALUE.pattern


def label_key_problem(key: str) -> str | None:
    """Why `key` is not a Kubernetes label key, or None."""
    prefix, slash, name = key.rpartition("/")
    if slash and (not prefix or len(prefix) > 253 or not _DNS_SUBDOMAIN.match(prefix)):
        return f"label key {key!r}: the prefix before '/' must be a DNS subdomain (lower case, at most 253)"
    if not _LABEL_NAME.match(name):
        return (f"label key {key!r}: the name must be 1 to 63 letters, digits, '-', '_' or '.', "
                "beginning and ending with a letter or digit")
    return None


def label_value_problem(key: str, value: str) -> str | None:
    """Why `value` is not a Kubernetes label value, or None."""
    if not _LABEL_VALUE.match(value):
        return (f"label {key!r}: the value {value!r} must be at most 63 letters, digits, '-', '_' or '.', "
                "beginning and ending with a letter or digit (or empty)")
    return None


def label_problems(labels: Mapping[str, str]) -> list[str]:
    out: list[str] = []
    for key, value in labels.items():
        problem = label_key_problem(key) or label_value_problem(key, value)
        if problem:
            out.append(problem)
    return out


def parse_labels(text: str) -> dict[str, str]:
    """`k=v[,k=v]` as the command line gives it; raises ValueError naming what is wrong."""
    labels: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{item!r} is not KEY=VALUE")
        key, value = key.strip(), value.strip()
        problem = label_key_problem(key) or label_value_problem(key, value)
        if problem:
            raise ValueError(problem)
        labels[key] = value
    return labels


# --------------------------------------------------------------------------- the workload


def workload_of(pod_name: str, labels: Mapping[str, str], owners: Iterable[tuple[str, str, bool]]) -> str:
    """The workload a pod belongs to, from its controlling owner reference (kind, name,
    controller), as Istio names workloads: a ReplicaSet's Deployment (the ReplicaSet's name
    without the pod-template-hash), a Job's CronJob (without its schedule suffix), else the
    owner's own name (StatefulSet, DaemonSet, Job, ...), else the pod's own name. Read from the
    pod alone, so the control plane needs no permission on ReplicaSets or Jobs; bounded by the
    workloads, never one per pod (a metric label)."""
    controller = next(((kind, name) for kind, name, is_controller in owners if is_controller), None)
    if controller is None:
        return pod_name
    kind, name = controller
    if kind == "ReplicaSet":
        template_hash = labels.get("pod-template-hash")
        if template_hash and name.endswith(f"-{template_hash}"):
            return name[: -len(template_hash) - 1]
        return name
    if kind == "Job":
        base, dash, suffix = name.rpartition("-")
        if dash and base and suffix.isdigit() and len(suffix) >= 8:  # a CronJob's Job: <cronjob>-<minutes>
            return base
    return name


# --------------------------------------------------------------------------- keys of budgets

CALLER_KEYS = ("namespace", "serviceAccount", "workload")


def caller_key(kind: str, caller: Caller) -> str | None:
    """The value a budget keyed by the caller (`spec.key.caller`) counts under: the namespace,
    `namespace/ServiceAccount` or `namespace/workload`. None where the workload is not known
    (the budget then fails closed). A caller without a namespace (local mode) counts under ""."""
    namespace = caller.namespace or ""
    if kind == "namespace":
        return namespace
    if kind == "serviceAccount":
        return f"{namespace}/{caller.name}"
    if caller.workload is None and caller.pod is not None:  # a pod not seen yet, or gone
        return None
    return f"{namespace}/{caller.workload or ''}"
