"""What an Envoy that is not ready yet is waiting for, in one sentence, from its admin
interface: `/ready` (its state), a few `/stats` counters, the clusters still warming
(`/config_dump?resource=dynamic_warming_clusters`) and the unready init targets (`/init_dump`).

`extproc up` says it while Envoy starts and names it when it gives up, so a start that hangs
on one slow DNS name, a control plane Envoy cannot reach or a config Envoy rejects says so
instead of a bare time limit. Pure: the admin calls are the caller's (`extproc.ops.up`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# the counters read from /stats (a regex filter: one request)
STATS = ("cluster_manager.cds.update_success", "cluster_manager.cds.update_rejected",
         "cluster_manager.cds.control_plane.connected_state", "cluster_manager.warming_clusters",
         "listener_manager.total_listeners_warming", "server.state")
STATS_FILTER = "^(" + "|".join(name.replace(".", r"\.") for name in STATS) + ")$"
WARMING_PATH = "/config_dump?resource=dynamic_warming_clusters"
SHOWN = 5  # names listed before "and N more"


def parse_stats(text: str) -> dict[str, int]:
    """`/stats` text (`name: value` lines) -> the integer counters and gauges."""
    stats = {}
    for line in text.splitlines():
        name, sep, value = line.partition(": ")
        if sep and value.strip().lstrip("-").isdigit():
            stats[name.strip()] = int(value)
    return stats


def warming_clusters(config_dump: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(cluster name, the DNS name it waits for) of each cluster still warming. With `?resource=`
    each of `configs` is one warming cluster; a whole dump holds them in `dynamic_warming_clusters`."""
    found = []
    for section in config_dump.get("configs", []):
        for entry in section.get("dynamic_warming_clusters", [section] if "cluster" in section else []):
            cluster = entry.get("cluster", {})
            address = ""
            for locality in cluster.get("load_assignment", {}).get("endpoints", []):
                for endpoint in locality.get("lb_endpoints", []):
                    socket = endpoint.get("endpoint", {}).get("address", {}).get("socket_address", {})
                    address = address or socket.get("address", "")
            found.append((cluster.get("name", "?"), address))
    return found


def unready_targets(init_dump: Mapping[str, Any]) -> list[str]:
    """The init targets Envoy still waits for (`/init_dump`)."""
    return [target for manager in init_dump.get("unready_targets_dumps", [])
            for target in manager.get("target_names", [])]


def _listed(names: Sequence[str]) -> str:
    shown = ", ".join(names[:SHOWN])
    return shown + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def waiting_for(state: str | None, stats: Mapping[str, int], warming: Sequence[tuple[str, str]] = (),
                unready: Sequence[str] = ()) -> str:
    """What Envoy waits for, most basic cause first. `state`: the body of `/ready`, None when
    the admin interface does not answer (yet)."""
    if state is None:
        return "Envoy's admin interface to answer (Envoy is still starting)"
    if stats.get("cluster_manager.cds.update_rejected", 0) and not stats.get("cluster_manager.cds.update_success"):
        return "clusters Envoy accepts: it rejected the control plane's (its log above says why)"
    if not stats.get("cluster_manager.cds.update_success"):
        if not stats.get("cluster_manager.cds.control_plane.connected_state"):
            return "a connection to the control plane (xDS) for its clusters"
        return "its clusters from the control plane (CDS)"
    if warming or stats.get("cluster_manager.warming_clusters"):
        names = [f"{name} ({address})" if address else name for name, address in warming]
        count = len(warming) or stats.get("cluster_manager.warming_clusters", 0)
        return f"{count} cluster(s) warming, each waiting for its first DNS answer" + (
            f": {_listed(names)}" if names else "")
    routes = [t for t in unready if "Rds" in t or "RDS" in t]
    if routes:
        return "its route configuration from the control plane (RDS)"
    secrets = [t.rpartition("SdsApi ")[2] for t in unready if "SdsApi " in t]
    if secrets:  # an egress gateway's certificate and CA bundle (extproc.envoy.secrets)
        return (f"its certificates from the control plane (SDS: {_listed(secrets)}): the control plane does not "
                "answer, or does not issue them for the token this Envoy presents (its log says which)")
    if stats.get("listener_manager.total_listeners_warming") or unready:
        return "its listener" + (f" ({_listed(list(unready))})" if unready else "")
    return f"its initialization to finish (state {state.strip() or '?'})"
