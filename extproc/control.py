"""The gRPC servers that Envoy talks to (CDS and RDS on grpcio; the ext_proc and the access log
service, which carry every request, on a lean HTTP/2 server on the next port), and how a new
config is rolled out to them without failing requests.

A change goes out in three steps: first Envoy gets the union of the old and new clusters (and,
for sidecars, of the old and new LLM host names) and acknowledges them, then the ext_proc
switches to the new routing table, then what is no longer used is removed. So a request is
never routed to a cluster Envoy does not have, and a sidecar never lets an LLM host's request
pass by the gateway.
"""

from __future__ import annotations

import asyncio
import logging
import os

import grpc
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.route.v3 import rds_pb2_grpc

from .accesslog import STREAM_ACCESS_LOGS, AccessLogReceiver
from .budget_store import BudgetGate
from .budgets import response_headers
from .admission import DEFAULT_MAX_BODY_BYTES_IN_FLIGHT, Inflight, register_metrics
from .drain import HEALTH_CHECK, HealthCheck
from .config.compile import Compiled
from .envoy_config import (DEFAULT_BODY_LIMIT, HostPort, UpstreamOptions, any_host_route_configuration,
                           provider_cluster, route_configuration,
                           to_cluster_proto, to_route_proto)
from .auth import Authenticator, GrpcAuthInterceptor
from .gateways import egress_clusters, forwarded_clusters
from .h2_server import serve as serve_h2
from .h2_server import serve_unix as serve_h2_unix
from .metrics import GatewayMetrics
from .routing import EMPTY_TABLE, RoutingTable
from .failover import PassiveHealth
from .failover_log import FailoverObserver
from .names import FAILOVER_CLUSTER_PREFIX, RETRY_AUTHORITY
from .retry_rewrite import RetryRewriter
from .server import PROCESS, ExternalProcessor, TableHolder
from .xds import CLUSTER_TYPE_URL, ROUTE_TYPE_URL, ClusterDiscovery, Publisher, RouteDiscovery

log = logging.getLogger("extproc.control")

ACK_TIMEOUT_S = 5.0
XDS_SOCKET, EXT_PROC_SOCKET = "xds.sock", "ext_proc.sock"  # in local mode's socket directory


class ControlPlane:
    def __init__(self, upstream: UpstreamOptions, body_limit: int = DEFAULT_BODY_LIMIT,
                 redis_url: str | None = None, redis_fail_closed: bool = False,
                 max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT):
        from .memory import give_back_free_heap

        self.inflight = Inflight(max_body_bytes_in_flight, give_back_free_heap)
        self.draining = False  # set by a graceful drain: health checks say NOT_SERVING
        self.connections: set = set()  # the ext_proc's open HTTP/2 connections
        self.reuse_port = False  # worker processes share the ext_proc port (extproc.workers)
        self.upstream = upstream
        self.holder = TableHolder(EMPTY_TABLE)
        self.clusters = Publisher(CLUSTER_TYPE_URL, "clusters")
        self.routes = Publisher(ROUTE_TYPE_URL, "sidecar routes")
        self.metrics = GatewayMetrics()
        register_metrics(self.metrics.registry, self.inflight)
        self.loaded = False  # a config is in force (readiness)
        self.budgets = BudgetGate(self.metrics.registry, lambda: self.holder.table, redis_url, redis_fail_closed)
        self._body_limit = body_limit
        self.health = PassiveHealth()  # failover's passive health, fed by the access log
        self._server: grpc.aio.Server | None = None
        self._ext_proc_server: asyncio.Server | None = None
        self.port = 0
        self.ext_proc_port = 0

    async def start(self, listen: HostPort, ext_proc_listen: HostPort | None = None,
                    authenticator: Authenticator | None = None, socket_dir: str | None = None) -> int:
        """Listens for xDS on `listen`, and for the ext_proc and access logs on `ext_proc_listen`
        (default: the next port; any free port when `listen`'s port is 0). Returns the first port.
        Over TCP every stream must prove its caller to `authenticator`. With `socket_dir` (a
        directory only our user can open: see `extproc.auth.private_dir`) both listen on Unix
        sockets there instead, `xds.sock` and `ext_proc.sock`, and the caller is local."""
        if socket_dir is None and authenticator is None:
            raise ValueError("the control plane listens on TCP only with an authenticator")
        interceptors = [GrpcAuthInterceptor(authenticator)] if socket_dir is None else []
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
        cds_pb2_grpc.add_ClusterDiscoveryServiceServicer_to_server(ClusterDiscovery(self.clusters), server)
        rds_pb2_grpc.add_RouteDiscoveryServiceServicer_to_server(RouteDiscovery(self.routes), server)
        where = f"unix:{socket_dir}/{XDS_SOCKET}" if socket_dir is not None else str(listen)
        self.port = server.add_insecure_port(where)
        if self.port == 0:
            raise OSError(f"cannot listen on {where} for gRPC (in use, or not an address of this host)")
        await server.start()
        self._server = server
        log.info("xDS (CDS, RDS) listening on %s", where if socket_dir is not None else f"{listen.host}:{self.port}")
        if ext_proc_listen is None:
            ext_proc_listen = HostPort(listen.host, listen.port + 1 if listen.port else 0)
        health = self.health
        failover = FailoverObserver(health, self.metrics.registry, hosts=lambda: self.holder.table.cluster_hosts)
        methods = {PROCESS: ExternalProcessor(self.holder, body_limit=self._body_limit, budgets=self.budgets,
                                              inflight=self.inflight, health=health).exchange,
                   RETRY_AUTHORITY + PROCESS: lambda *_: RetryRewriter(self.holder, self._body_limit).exchange(),
                   STREAM_ACCESS_LOGS: AccessLogReceiver(self.metrics, self.budgets, failover).call,
                   HEALTH_CHECK: lambda *_: HealthCheck(lambda: not self.draining)}
        # The ext_proc answers a body over the limit with a 413 itself; a body chunk may be larger
        # than the limit (Envoy sends what it has read), up to Envoy's buffer limit.
        chunk_limit = self._body_limit + (4 << 20)
        await self.budgets.start()
        if socket_dir is not None:
            path = f"{socket_dir}/{EXT_PROC_SOCKET}"
            os.chmod(f"{socket_dir}/{XDS_SOCKET}", 0o600)
            self._ext_proc_server = await serve_h2_unix(path, methods, chunk_limit, self.connections)
            log.info("ext_proc and access log service listening on unix:%s", path)
            return self.port
        self._ext_proc_server = await serve_h2(ext_proc_listen.host, ext_proc_listen.port, methods, chunk_limit,
                                               authenticator, self.connections, self.reuse_port)
        self.ext_proc_port = self._ext_proc_server.sockets[0].getsockname()[1]
        log.info("ext_proc and access log service listening on %s:%d", ext_proc_listen.host, self.ext_proc_port)
        return self.port

    async def stop(self, grace: float = 2.0) -> None:
        await self.budgets.stop()
        if self._ext_proc_server is not None:
            self._ext_proc_server.close()
        if self._server is not None:
            await self._server.stop(grace)

    def _clusters(self, table: RoutingTable) -> dict[str, dict]:
        clusters = {name: provider_cluster(name, host, self.upstream) for host, name in table.clusters.items()}
        clusters.update((name, provider_cluster(name, host, self.upstream, failover=True))
                        for host, name in table.failover_clusters.items())
        clusters.update(egress_clusters(table))  # the egress gateways sidecars send hosts to
        return clusters

    async def apply(self, compiled: Compiled) -> None:
        new = compiled.table
        old_clusters, new_clusters = self._clusters(self.holder.table), self._clusters(new)
        old_hosts, new_hosts = set(self.holder.table.routes), set(new.routes)
        old_forwarded, new_forwarded = forwarded_clusters(self.holder.table), forwarded_clusters(new)
        old_limits, new_limits = response_headers(self.holder.table), response_headers(new)  # x-ratelimit-*
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
            for publisher, version in zip((self.clusters, self.routes), versions):
                if not await publisher.wait_answered(version, ACK_TIMEOUT_S):
                    log.warning("not every Envoy answered %s version %d within %.0fs", publisher.type_url, version,
                                ACK_TIMEOUT_S)
            self.holder.table = new
            if union_clusters != new_clusters:
                await self._publish_clusters(new_clusters)
            if (union_hosts != new_hosts or union_clusters != new_clusters or union_forwarded != new_forwarded
                    or old_limits != new_limits):
                await self._publish_hosts(new_hosts, list(new_clusters), new_forwarded, new_limits)
        else:
            self.holder.table = new
        self.health.configure(new.health)
        self.loaded = True
        log.info("routing table %s in force: %d host names, %d providers", new.version, len(new.routes), len(new.clusters))

    async def _publish_clusters(self, clusters: dict[str, dict]) -> int:
        return await self.clusters.publish([to_cluster_proto(c) for c in clusters.values()])

    async def _publish_hosts(self, hosts: set[str], clusters: list[str], forwarded: dict[str, str] | None = None,
                             budget_headers: frozenset[str] = frozenset()) -> int:
        # the failover route names the failover clusters only; without rules with `retries` there is none
        clusters = [name for name in clusters if name.startswith(FAILOVER_CLUSTER_PREFIX)]
        return await self.routes.publish([
            to_route_proto(route_configuration(sorted(hosts), clusters=clusters, body_limit=self._body_limit,
                                               forwarded=forwarded, budget_headers=budget_headers)),
            to_route_proto(any_host_route_configuration(clusters, self._body_limit, budget_headers))])
