"""Workload identities in certificates: what the control plane writes into the certificate it
issues a verified caller, and what an egress gateway reads back from a client certificate.

A sidecar's Envoy proves itself to the control plane with its pod-bound ServiceAccount token
(`extproc.dataplane.authentication`); the control plane then issues it a short-lived workload
certificate (`extproc.ops.workload_ca`, over SDS: `extproc.envoy.secrets`), which its Envoy
presents to the egress gateway on every connection. The certificate names the caller:

- its URI SAN is the SPIFFE ID `spiffe://cluster.local/ns/<namespace>/sa/<ServiceAccount>`
  (SPIFFE's X.509-SVID form, as Istio writes it), its only URI SAN;
- its subject names the pod the token was bound to: `CN=<pod name>, serialNumber=<pod UID>`, or
  only `CN=<ServiceAccount>` for a caller without a pod.

The gateway's Envoy hands both to its ext_proc with each request (`extproc.protocol`), which
turns them back into the caller here (`parse_peer`) and takes the pod's labels and workload from
its own pod watch, so a request is decided at the gateway for the same caller as at a sidecar.
Nothing the application sends is read: the names come from the TLS connection Envoy verified
against the control plane's CA.

An egress gateway `NAMESPACE/NAME` runs as ServiceAccount NAME in NAMESPACE: the sidecars accept
only a server certificate naming that identity (`gateway_identity`).

Pure decisions on plain data; the certificates are made in `extproc.ops.workload_ca`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..protocol import WORKLOAD_SECRET
from .caller import Caller

TRUST_DOMAIN = "cluster.local"
SPIFFE_PREFIX = f"spiffe://{TRUST_DOMAIN}/"
# The namespace an operator's Envoy (local mode, a static token) is issued a certificate for when
# the operator stated none (`--source-namespace`): the namespace objects in files are in.
LOCAL_NAMESPACE = "default"

_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_UID = re.compile(r"^[0-9A-Za-z-]{1,64}$")
_SPIFFE = re.compile(rf"^{re.escape(SPIFFE_PREFIX)}ns/([^/]+)/sa/([^/]+)$")


@dataclass(frozen=True, slots=True)
class WorkloadName:
    """The identity a workload certificate names: namespace and ServiceAccount, and the pod (name
    and UID) where the caller's token was bound to one."""

    namespace: str
    account: str
    pod: str | None = None
    uid: str | None = None

    @property
    def spiffe_id(self) -> str:
        return spiffe_id(self.namespace, self.account)

    def subject(self) -> tuple[tuple[str, str], ...]:
        """The certificate's subject as (attribute, value): `CN` the pod (or the ServiceAccount),
        `serialNumber` the pod's UID."""
        if self.pod is not None and self.uid is not None:
            return (("CN", self.pod), ("serialNumber", self.uid))
        return (("CN", self.account),)


def spiffe_id(namespace: str, account: str) -> str:
    return f"{SPIFFE_PREFIX}ns/{namespace}/sa/{account}"


def gateway_identity(ref: str) -> str:
    """The SPIFFE ID an egress gateway `namespace/name` presents: ServiceAccount `name` in
    `namespace` (k8s/egress-gateway runs it so)."""
    namespace, _, name = ref.partition("/")
    return spiffe_id(namespace, name)


def name_of(caller: Caller) -> WorkloadName:
    """The identity a verified caller's own certificate names. An operator's Envoy without a
    stated namespace gets `LOCAL_NAMESPACE`."""
    return WorkloadName(caller.namespace or LOCAL_NAMESPACE, caller.name, caller.pod if caller.uid else None,
                        caller.uid if caller.pod else None)


def parse_spiffe(uri: str) -> tuple[str, str] | None:
    """(namespace, ServiceAccount) of one of our SPIFFE IDs, or None."""
    found = _SPIFFE.match(uri)
    if found is None:
        return None
    namespace, account = found.groups()
    if not _LABEL.match(namespace) or not _SUBDOMAIN.match(account):
        return None
    return namespace, account


def granted(requested: str, caller: Caller, operator: bool) -> WorkloadName | None:
    """Which identity an Envoy asking the control plane for the secret `requested` is issued,
    or None. `default` (`WORKLOAD_SECRET`): its own, as its credentials prove it. A SPIFFE ID:
    that identity, for the operator's own Envoys (local mode's socket, the static token: they may
    get every key anyway, and an egress gateway started locally asks for its own name so), and
    for any other caller only when it is its own: a sidecar can never obtain another workload's
    certificate, nor a gateway's."""
    if requested == WORKLOAD_SECRET:
        return name_of(caller)
    parsed = parse_spiffe(requested)
    if parsed is None:
        return None
    if operator:
        return WorkloadName(*parsed)
    own = name_of(caller)
    if caller.namespace is not None and (own.namespace, own.account) == parsed:
        return own
    return None


def parse_peer(uri: str, subject: str) -> WorkloadName | None:
    """The caller a client certificate names, from its first URI SAN and its subject as Envoy
    formats them (RFC 2253: `serialNumber=<uid>,CN=<pod>`); None when the URI is not one of our
    SPIFFE IDs or the subject is not one we write. A subject without a serialNumber names no pod."""
    parsed = parse_spiffe(uri)
    if parsed is None:
        return None
    fields: dict[str, str] = {}
    for part in subject.split(","):
        key, sep, value = part.strip().partition("=")
        if not sep or "\\" in value or key in fields:
            return None
        fields[key] = value
    pod, uid = fields.get("CN"), fields.get("serialNumber")
    if uid is None:
        return WorkloadName(*parsed)
    if pod is None or not _SUBDOMAIN.match(pod) or not _UID.match(uid):
        return None
    return WorkloadName(parsed[0], parsed[1], pod, uid)


def renewal_time(not_before: float, not_after: float) -> float:
    """When a certificate is replaced: at half its lifetime, as Istio's agent does, so a renewal
    that fails has the other half to be retried in."""
    return not_before + (not_after - not_before) / 2


def connection_lifetime(ttl_s: float) -> float:
    """How long a sidecar keeps a connection to an egress gateway: half a certificate's lifetime.
    A connection is made with the certificate current then, which is renewed at half its
    lifetime, so no connection outlives the certificate it was made with, and a renewed
    certificate is in use on every connection within this time."""
    return ttl_s / 2
