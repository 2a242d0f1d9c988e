"""Which proxy decides which host: `LLMRoute.spec.gateways`, as Istio's VirtualService reads it.

A route's `gateways` names the proxies its rules apply to: the reserved `mesh` means every
sidecar (the default when the field is left out or empty); any other entry names an egress
gateway, `namespace/name`, or `name` in the route's own namespace. A process decides for one
*view*: the mesh (the control plane of the sidecars, and a plain `extproc up`), or one egress
gateway (`--gateway NAMESPACE/NAME`). In its view a process serves exactly the routes bound to
it. In the mesh view, the host names of routes bound only to egress gateways are *forwarded*:
the sidecars send that host's plain HTTP to the gateway's Service (Host header kept) with none
of the gateway filters, and the sidecars' ext_proc refuses to decide for it, so no key for it
ever reaches an application pod.

A provider's own host, when no LLMRoute takes it over, is routed with the provider's default
config (see `extproc.config.compile`); here it is bound where the provider's key is needed: the union of the
bindings of the routes that name it in a backendRef, or the mesh when none does. So a provider
used only by gateway-bound routes is decided only by those gateways, its own host included.

Pure decisions on plain data; `extproc.config.compile` applies them, `extproc.envoy.clusters`
and `extproc.envoy.routes` ship them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from ..errors import GatewayError
from .table import Forward, RoutingTable, normalize_host

MESH = "mesh"
DEFAULT_GATEWAY_PORT = 80
# Prefix of the sidecars' cluster for an egress gateway: `llm_egress_<namespace>_<name>`.
EGRESS_CLUSTER_PREFIX = "llm_egress_"
_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class View:
    """Who this process decides for, and the egress gateways it knows (name -> "host:port").

    `gateway` is None for the mesh: the sidecars' control plane, or a plain `extproc up`."""

    gateway: str | None = None
    egress: Mapping[str, str] = field(default_factory=dict)

    @property
    def target(self) -> str:
        return self.gateway or MESH

    @property
    def is_mesh(self) -> bool:
        return self.gateway is None

    def knows(self, ref: str) -> bool:
        return ref == MESH or ref in self.egress or ref == self.gateway


MESH_VIEW = View()


def parse_gateway_name(text: str) -> str:
    """`NAMESPACE/NAME` as given on the command line, checked; raises ValueError."""
    namespace, sep, name = text.partition("/")
    if not sep or not _LABEL.match(namespace) or not _LABEL.match(name):
        raise ValueError(f"{text!r} is not NAMESPACE/NAME (lower-case DNS labels)")
    return text


def default_address(ref: str) -> str:
    """Where a gateway's Service answers when no address is given: `NAME.NAMESPACE.svc.cluster.local:80`."""
    namespace, _, name = ref.partition("/")
    return f"{name}.{namespace}.svc.cluster.local:{DEFAULT_GATEWAY_PORT}"


def gateway_ref(entry: str, namespace: str) -> str:
    """One `gateways` entry as `namespace/name` (or `mesh`); raises ValueError on a malformed one."""
    if entry == MESH:
        return MESH
    parts = entry.split("/")
    if len(parts) == 1:
        parts = [namespace, entry]
    if len(parts) != 2 or not all(_LABEL.match(p) for p in parts):
        raise ValueError(f"{entry!r} is not 'mesh', 'name' or 'namespace/name' (lower-case DNS labels)")
    return "/".join(parts)


@dataclass(frozen=True)
class BindingCheck:
    binding: frozenset[str]  # what the route is bound to, `mesh` included where it applies
    errors: tuple[tuple[str, str, str], ...]  # (field, message, reason for a Kubernetes condition)


def route_binding(gateways: list[str] | None, namespace: str, view: View) -> BindingCheck:
    """A route's binding, and what is wrong with its `gateways` in this view: a malformed entry
    everywhere; in the mesh view also a gateway the control plane does not know (it could not
    send the host anywhere). A gateway checks only the entries naming itself."""
    if not gateways:
        return BindingCheck(frozenset({MESH}), ())
    refs: list[str] = []
    errors: list[tuple[str, str, str]] = []
    for i, entry in enumerate(gateways):
        try:
            ref = gateway_ref(entry, namespace)
        except ValueError as exc:
            errors.append((f"spec.gateways[{i}]", str(exc), "InvalidSpec"))
            continue
        if view.is_mesh and not view.knows(ref):
            known = ", ".join(sorted(view.egress)) or "none"
            errors.append((f"spec.gateways[{i}]",
                           f"no egress gateway {ref} is known (known: {known}; declare one with --egress-gateway)",
                           "GatewayNotFound"))
        refs.append(ref)
    return BindingCheck(frozenset(refs), tuple(errors))


def declared_binding(gateways: list[str] | None, namespace: str) -> tuple[str, ...]:
    """A route's binding as declared, in order, malformed entries left out: what a provider it
    names inherits. A route that names gateways but not `mesh` never binds the mesh, even when
    all its entries are malformed: a provider is never handed to the sidecars by a typo."""
    if not gateways:
        return (MESH,)
    refs: list[str] = []
    for entry in gateways:
        try:
            ref = gateway_ref(entry, namespace)
        except ValueError:
            continue
        if ref not in refs:
            refs.append(ref)
    return tuple(refs)


def provider_binding(referrers: Iterable[tuple[str, ...]]) -> tuple[str, ...]:
    """Where a provider's own host is decided: wherever the routes naming it are (in the order
    they name them), else the mesh."""
    found: list[str] = []
    seen_any = False
    for binding in referrers:
        seen_any = True
        found.extend(ref for ref in binding if ref not in found)
    return tuple(found) if seen_any else (MESH,)


def forward_to(binding: Iterable[str], view: View) -> Forward | None:
    """In the mesh view, where the sidecars send a host bound elsewhere: the first gateway listed
    that the view knows. None when the mesh decides itself, or when no known gateway serves it
    (the host is then unknown to the sidecars: 404)."""
    ordered = list(binding)
    if not view.is_mesh or MESH in ordered:
        return None
    for ref in ordered:
        if ref in view.egress:
            return Forward(gateway=ref, cluster=egress_cluster_name(ref), address=view.egress[ref])
    return None


def egress_cluster_name(ref: str) -> str:
    """Namespaces and names are DNS labels (no '_'), so the mapping is one to one."""
    namespace, _, name = ref.partition("/")
    return f"{EGRESS_CLUSTER_PREFIX}{namespace}_{name}"


def forwarded_clusters(table: RoutingTable) -> dict[str, str]:
    """host -> the egress gateway's cluster, for the sidecars' routes (RDS)."""
    return {host: forward.cluster for host, forward in table.forwarded.items()}


def forward_of(table: RoutingTable, host: str) -> str | None:
    """For the dry run: where a forwarded host goes, in one line."""
    forward = table.forwarded.get(normalize_host(host))
    if forward is None:
        return None
    return (f"host {normalize_host(host)!r} is decided by the egress gateway {forward.gateway}: the sidecars send it "
            f"to {forward.address} (cluster {forward.cluster}); add --gateway {forward.gateway} to see its decision")


def refusal(table: RoutingTable, authority: str) -> GatewayError | None:
    """The sidecars' ext_proc never decides a forwarded host (their Envoy sends it to the gateway
    without asking; this answers anything that asks anyway): a JSON 404 that says where it is
    decided, and no key."""
    forward = table.forwarded.get(normalize_host(authority))
    if forward is None:
        return None
    return GatewayError(404, f"host {normalize_host(authority)!r} is decided only by the egress gateway "
                             f"{forward.gateway}; this proxy holds no key for it", "egress_gateway_host")
