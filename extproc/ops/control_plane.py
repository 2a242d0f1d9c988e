"""The control plane of one process: the xDS server Envoy gets its clusters and routes from
(grpcio), beside this process's data plane (`extproc.ops.data_plane`), and how a new config
is rolled out to both without failing requests.

A change goes out in three steps: first Envoy gets the union of the old and new clusters (and,
for sidecars, of the old and new LLM host names) and acknowledges them, then the data plane
switches to the new routing table, then what is no longer used is removed. So a request is
never routed to a cluster Envoy does not have, and a sidecar never lets an LLM host's request
pass by the gateway.
"""

from __future__ import annotations

import logging
import os

import grpc
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.route.v3 import rds_pb2_grpc

from ..config.compile import Compiled
from ..dataplane.authentication import Authenticator, GrpcAuthInterceptor
from ..envoy.addresses import HostPort
from ..envoy.clusters import UpstreamOptions, egress_clusters, provider_cluster, to_cluster_proto
from ..envoy.routes import any_host_route_configuration, route_configuration, to_route_proto
from ..envoy.xds import CLUSTER_TYPE_URL, ROUTE_TYPE_URL, ClusterDiscovery, Publisher, RouteDiscovery
from ..policy.budgets import response_headers
from ..policy.capacity import DEFAULT_PROVIDER_LIMITS
from ..policy.gateway_binding import forwarded_clusters
from ..policy.table import RoutingTable
from ..protocol import EXT_PROC_SOCKET, FAILOVER_CLUSTER_PREFIX, XDS_SOCKET
from .data_plane import DataPlane

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0


class ControlPlane:
    """xDS for the Envoys, and the rollout of a config to them and to `data_plane`. `reuse_port`:
    worker processes share the ext_proc port (`extproc.ops.workers`)."""

    def __init__(self, upstream: UpstreamOptions, data_plane: DataPlane, reuse_port: bool = False):
        self.upstream = upstream
        self.data_plane = data_plane
        self.reuse_port = reuse_port
        self.clusters = Publisher(CLUSTER_TYPE_URL, "clusters")
        self.routes = Publisher(ROUTE_TYPE_URL, "sidecar routes")
        self.loaded = False  # a config is in force (readiness)
        self.xds_server: grpc.aio.Server | None = None
        self.port = 0
        self.ext_proc_port = 0

    @property
    def table(self) -> RoutingTable:
        return self.data_plane.holder.table

    async def start(self, listen: HostPort, ext_proc_listen: HostPort | None = None,
                    authenticator: Authenticator | None = None, socket_dir: str | None = None) -> int:
        """Listens for xDS on `listen`, and for the ext_proc and access logs on `ext_proc_listen`
        (default: the next port; any free port when `listen`'s port is 0). Returns the first port.
        Over TCP every stream must prove its caller to `authenticator`. With `socket_dir` (a
        directory only our user can open: see `extproc.ops.socket_dir`) both listen on Unix
        sockets there instead, `xds.sock` and `ext_proc.sock`, and the caller is local."""
        if socket_dir is None and authenticator is None:
            raise ValueError("the control plane listens on TCP only with an authenticator")
        interceptors = [GrpcAuthInterceptor(authenticator)] if socket_dir is None and authenticator else []
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
        cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(ClusterDiscovery(self.clusters), server)
        rds_pb2_grpc.add_RouteDiscoveryServiceServicer_to_server(RouteDiscovery(self.routes), server)
        where = f"unix:{socket_dir}/{XDS_SOCKET}" if socket_dir is not None else str(listen)
        self.port = server.add_insecure_port(where)
        if self.port == 0:
            raise OSError(f"cannot listen on {where} for gRPC (in use, or not an address of this host)")
        await server.start()
        self.xds_server = server
        log.info("xDS (CDS, RDS) listening on %s", where if socket_dir is not None else f"{listen.host}:{self.port}")
        if ext_proc_listen is None:
            ext_proc_listen = HostPort(listen.host, listen.port + 1 if listen.port else 0)
        await self.data_plane.start()
        if socket_dir is not None:
            os.chmod(f"{socket_dir}/{XDS_SOCKET}", 0o600)
            await self.data_plane.listen_unix(f"{socket_dir}/{EXT_PROC_SOCKET}")
            return self.port
        self.ext_proc_port = await self.data_plane.listen_tcp(ext_proc_listen.host, ext_proc_listen.port,
                                                              authenticator, self.reuse_port)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.data_plane.stop()
        if self.xds_server is not None:
            await self.xds_server.stop(grace)

    def _clusters(self, table: RoutingTable) -> dict[str, dict]:
        limits = table.capacity.get
        clusters = {name: provider_cluster(name, host, self.upstream, limits=limits(host, DEFAULT_PROVIDER_LIMITS))
                    for host, name in table.clusters.items()}
        clusters.update((name, provider_cluster(name, host, self.upstream, failover=True,
                                                limits=limits(host, DEFAULT_PROVIDER_LIMITS)))
                        for host, name in table.failover_clusters.items())
        clusters.update(egress_clusters(table))  # the egress gateways sidecars send hosts to
        return clusters

    async def apply(self, compiled: Compiled) -> None:
        old, new = self.table, compiled.table
        old_clusters, new_clusters = self._clusters(old), self._clusters(new)
        old_hosts, new_hosts = set(old.routes), set(new.routes)
        old_forwarded, new_forwarded = forwarded_clusters(old), forwarded_clusters(new)
        old_limits, new_limits = response_headers(old.budgets), response_headers(new.budgets)  # x-ratelimit-*
        first = self.clusters.version == 0
        if (first or new_clusters != old_clusters or new_hosts != old_hosts or new_forwarded != old_forwarded
                or new_limits != old_limits):
            union_clusters = {**old_clusters, **new_clusters}
            union_hosts = old_hosts | new_hosts
            union_forwarded = {**old_forwarded, **new_forwarded}
            versions = (await self._publish_clusters(union_clusters),
                        # while a change rolls out, the x-ratelimit-* headers for both tables
                        await self._publish_hosts(union_hosts, list(union_clusters), union_forwarded,
                                                  old_limits | new_limits))
            for publisher, version in zip((self.clusters, self.routes), versions, strict=True):
                if not await publisher.wait_answered(version, ACK_TIMEOUT_S):
                    log.warning("not every Envoy answered %s version %d within %.0fs", publisher.type_url, version,
                                ACK_TIMEOUT_S)
            self.data_plane.switch(new)
            if union_clusters != new_clusters:
                await self._publish_clusters(new_clusters)
            if (union_hosts != new_hosts or union_clusters != new_clusters or union_forwarded != new_forwarded
                    or old_limits != new_limits):
                await self._publish_hosts(new_hosts, list(new_clusters), new_forwarded, new_limits)
        else:
            self.data_plane.switch(new)
        self.loaded = True
        log.info("routing table %s in force: %d host names, %d providers", new.version, len(new.routes),
                 len(new.clusters))

    async def _publish_clusters(self, clusters: dict[str, dict]) -> int:
        return await self.clusters.publish([to_cluster_proto(c) for c in clusters.values()])

    async def _publish_hosts(self, hosts: set[str], clusters: list[str], forwarded: dict[str, str] | None = None,
                             budget_headers: frozenset[str] = frozenset()) -> int:
        # the failover route names the failover clusters only; without rules with `retries` there is none
        clusters = [name for name in clusters if name.startswith(FAILOVER_CLUSTER_PREFIX)]
        body_limit = self.data_plane.body_limit
        return await self.routes.publish([
            to_route_proto(route_configuration(sorted(hosts), clusters=clusters, body_limit=body_limit,
                                               forwarded=forwarded, budget_headers=budget_headers)),
            to_route_proto(any_host_route_configuration(clusters, body_limit, budget_headers))])
