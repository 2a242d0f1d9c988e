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

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import replace

import grpc
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.route.v3 import rds_pb2_grpc
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf.message import Message

from ..config.compile import Compiled
from ..dataplane.authentication import Authenticator, GrpcAuthInterceptor, metadata_caller, speaks_for_operator
from ..envoy.addresses import HostPort, is_ip
from ..envoy.cluster_protos import ClusterProtos
from ..envoy.clusters import (
    PROVIDER_PORT,
    GatewayTls,
    UpstreamOptions,
    egress_clusters,
    provider_cluster,
    to_cluster_proto,
)
from ..envoy.pools import pool_cluster
from ..envoy.routes import any_host_route_configuration, route_configuration, to_route_proto
from ..envoy.secrets import SecretDiscovery
from ..envoy.xds import CLUSTER_TYPE_URL, ROUTE_TYPE_URL, ClusterDiscovery, Publisher, RouteDiscovery
from ..policy.addresses import AddressBook, AddressGauge, Change, Lookup, ProviderNames
from ..policy.budgets import response_headers
from ..policy.caller import Caller
from ..policy.capacity import DEFAULT_PROVIDER_LIMITS, ConnectionLimits
from ..policy.gateway_binding import forwarded_clusters
from ..policy.peer_identity import connection_lifetime
from ..policy.table import Pool, RoutingTable
from ..protocol import EXT_PROC_SOCKET, FAILOVER_ROUTE_PREFIXES, XDS_SOCKET, retry_cluster
from .address_watch import AddressWatch, resolver_for
from .data_plane import DataPlane
from .workload_ca import Issuer

log = logging.getLogger(__name__)

ACK_TIMEOUT_S = 5.0
ACK_S_PER_NEW_CLUSTER = 0.005  # and this much longer per cluster a change adds


class ControlPlane:
    """xDS for the Envoys, and the rollout of a config to them and to `data_plane`. `reuse_port`:
    worker processes share the ext_proc port (`extproc.ops.workers`). `issuer`: the workload
    certificates it serves over SDS (`extproc.ops.workload_ca`), and so the sidecars reach egress
    gateways over mutual TLS; None: no SDS, and egress gateways over plain HTTP."""

    def __init__(self, upstream: UpstreamOptions, data_plane: DataPlane, reuse_port: bool = False,
                 issuer: Issuer | None = None):
        self.upstream = upstream
        self.data_plane = data_plane
        self.reuse_port = reuse_port
        self.issuer = issuer
        self.gateway_tls = GatewayTls(connection_lifetime(issuer.ttl_s)) if issuer is not None else None
        self.clusters = Publisher(CLUSTER_TYPE_URL, "clusters")
        self.routes = Publisher(ROUTE_TYPE_URL, "sidecar routes")
        self.loaded = False  # a config is in force (readiness)
        self._built: dict[tuple[str, str, bool, ConnectionLimits], dict] = {}  # (name, host, failover) -> cluster
        self._pools_built: dict[tuple[str, str, str, bool], dict] = {}  # (name, host, protocol, failover) -> cluster
        self._protos: dict[str, tuple[dict, Message]] = {}  # name -> (cluster, its protobuf)
        self._hosts: dict[str, str] = {}  # a built provider cluster's name -> its host
        self._converter = ClusterProtos()
        self.xds_server: grpc.aio.Server | None = None
        self.port = 0
        self.ext_proc_port = 0
        # whether providers' names resolve (extproc.policy.addresses), asked as Envoy asks
        self.addresses = ProviderNames(AddressBook())
        self.watch = AddressWatch(resolver_for(upstream.dns_resolver), self.addresses, self._addresses_changed)
        self._watching: asyncio.Task | None = None
        data_plane.metrics.registry.register(AddressGauge(self.addresses))
        # told every provider's last lookup when one changes (Kubernetes: the LLMProviders' conditions)
        self.on_addresses: Callable[[dict[str, Lookup]], None] | None = None

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
        if self.issuer is not None:  # workload certificates, to the caller each stream proves it is
            sds_pb2_grpc.add_SecretDiscoveryServiceServicer_to_server(
                SecretDiscovery(self._identify(None if socket_dir is not None else authenticator), self.issuer.secret),
                server)
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
        self._watching = asyncio.create_task(self.watch.run())
        if socket_dir is not None:
            os.chmod(f"{socket_dir}/{XDS_SOCKET}", 0o600)
            await self.data_plane.listen_unix(f"{socket_dir}/{EXT_PROC_SOCKET}")
            return self.port
        self.ext_proc_port = await self.data_plane.listen_tcp(ext_proc_listen.host, ext_proc_listen.port,
                                                              authenticator, self.reuse_port)
        return self.port

    def _identify(self, authenticator: Authenticator | None) -> Callable[[grpc.aio.ServicerContext],
                                                                         Awaitable[tuple[Caller, bool] | None]]:
        """Who an SDS stream is for: its verified caller (over TCP, as the stream's check found it;
        on a Unix socket, local mode's caller), and whether that is the operator's own Envoy."""
        async def identify(context: grpc.aio.ServicerContext) -> tuple[Caller, bool] | None:
            if authenticator is None:
                return self.data_plane.local, True
            caller = await metadata_caller(authenticator, context.invocation_metadata())
            return None if caller is None else (caller, speaks_for_operator(authenticator))

        return identify

    async def stop(self, grace: float = 2.0) -> None:
        if self._watching is not None:
            self._watching.cancel()
        await self.data_plane.stop()
        if self.xds_server is not None:
            await self.xds_server.stop(grace)

    def _provider_cluster(self, name: str, host: str, failover: bool, limits: ConnectionLimits) -> dict:
        """A provider's cluster, built once while it is configured (thousands of providers: a
        reload builds and converts only the new ones)."""
        key = (name, host, failover, limits)
        cluster = self._built.get(key)
        if cluster is None:
            cluster = self._built[key] = provider_cluster(name, host, self.upstream, failover=failover,
                                                          limits=limits)
            self._hosts[name] = host
        return cluster

    def _pool_cluster(self, name: str, pool: Pool, failover: bool) -> dict:
        """A pool's cluster (`extproc.envoy.pools`): the same dict while its kind and protocol
        stay, whatever its endpoints do (they are no part of it)."""
        key = (name, pool.host, pool.protocol, failover)
        cluster = self._pools_built.get(key)
        if cluster is None:
            cluster = self._pools_built[key] = pool_cluster(name, pool, self.upstream, failover)
        return cluster

    def _clusters(self, table: RoutingTable) -> dict[str, dict]:
        pools, limits = table.pools, table.capacity.get
        clusters = {name: self._provider_cluster(name, host, False, limits(host, DEFAULT_PROVIDER_LIMITS))
                    if host not in pools else self._pool_cluster(name, pools[host], False)
                    for host, name in table.clusters.items()}
        clusters.update((name, self._provider_cluster(name, host, True, limits(host, DEFAULT_PROVIDER_LIMITS))
                         if host not in pools else self._pool_cluster(name, pools[host], True))
                        for host, name in table.failover_clusters.items())
        clusters.update((retry_cluster(host), self._pool_cluster(retry_cluster(host), pools[host], True))
                        for host in table.failover_clusters if host in pools)  # a pool's next endpoint
        # the egress gateways sidecars send hosts to
        clusters.update(egress_clusters(table, self.upstream.dns_resolver, self.gateway_tls))
        return clusters

    async def apply(self, compiled: Compiled) -> None:
        old, new = self.table, compiled.table
        old_clusters, new_clusters = self._clusters(old), self._clusters(new)
        old_hosts, new_hosts = set(old.host_names), set(new.host_names)
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
            # Envoy answers once it has built the new clusters: about 2 ms each (most of it parsing
            # the CA bundle), so thousands of new providers take seconds
            wait_s = ACK_TIMEOUT_S + ACK_S_PER_NEW_CLUSTER * len(new_clusters.keys() - old_clusters.keys())
            for publisher, version in zip((self.clusters, self.routes), versions, strict=True):
                if not await publisher.wait_answered(version, wait_s):
                    log.warning("not every Envoy answered %s version %d within %.0fs", publisher.type_url, version,
                                wait_s)
            self._switch(new)
            if union_clusters != new_clusters:
                await self._publish_clusters(new_clusters)
            self._forget_clusters(new_clusters)
            if (union_hosts != new_hosts or union_clusters != new_clusters or union_forwarded != new_forwarded
                    or old_limits != new_limits):
                await self._publish_hosts(new_hosts, list(new_clusters), new_forwarded, new_limits)
        else:
            self._switch(new)
        self.loaded = True
        log.info("routing table %s in force: %d host names, %d providers", new.version, len(new.host_names),
                 len(new.clusters))

    def _switch(self, table: RoutingTable) -> None:
        """The data plane's table from now on, with the providers whose name does not resolve."""
        self.watch.track(self._dns_names(table))
        self.data_plane.switch(replace(table, unresolved=self.addresses.unresolved()))

    def _dns_names(self, table: RoutingTable) -> dict[str, str]:
        """Provider host -> the name Envoy resolves for it (none for a fixed IP address)."""
        names = {}
        for host in table.clusters:
            if host in table.pools:  # a pool's endpoints are addresses
                continue
            target = self.upstream.resolve.get(host, HostPort(host, PROVIDER_PORT)).host
            if not is_ip(target):
                names[host] = target
        return names

    def _addresses_changed(self, changes: list[Change]) -> None:
        """Names looked up for the first time, or that stopped (or started) resolving: a name
        that does not resolve said once, failover told, and the listener (Kubernetes
        conditions) given every provider's last lookup."""
        for change in changes:
            providers = ", ".join(self.addresses.hosts_of(change.name)) or change.name
            if change.lookup.resolved and change.before is None:
                continue  # resolves at its first lookup, as nearly every name does: nothing to say
            if change.lookup.resolved:
                log.info("provider %s: its host name resolves again (%s): serving it", providers,
                         change.lookup.describe(change.name))
            else:
                log.warning("provider %s: its host name %s; its requests get a 503 provider_address_unknown and "
                            "failover skips it until it resolves (asked again within seconds)", providers,
                            change.lookup.describe(change.name).removeprefix(change.name + " "))
        unresolved = self.addresses.unresolved()
        if unresolved != self.table.unresolved:
            self.data_plane.switch(replace(self.table, unresolved=unresolved))
        if self.on_addresses is not None:
            self.on_addresses({host: lookup for host, lookup in self.addresses.lookups() if lookup is not None})

    async def _publish_clusters(self, clusters: dict[str, dict]) -> int:
        return await self.clusters.publish([self._cluster_proto(c) for c in clusters.values()])

    def _cluster_proto(self, cluster: dict) -> Message:
        """`cluster` as protobuf, converted once per cluster dict (`_provider_cluster` keeps them),
        a provider's through its kind's template (`extproc.envoy.cluster_protos`)."""
        name = cluster["name"]
        cached = self._protos.get(name)
        if cached is not None and cached[0] is cluster:
            return cached[1]
        host = self._hosts.get(name)
        proto = self._converter.convert(cluster, name, host) if host else to_cluster_proto(cluster)
        self._protos[cluster["name"]] = (cluster, proto)
        return proto

    def _forget_clusters(self, keep: dict[str, dict]) -> None:
        """Built clusters no longer published are dropped."""
        self._built = {key: c for key, c in self._built.items() if keep.get(key[0]) is c}
        self._pools_built = {key: c for key, c in self._pools_built.items() if keep.get(key[0]) is c}
        self._hosts = {key[0]: key[1] for key in self._built}
        self._protos = {name: entry for name, entry in self._protos.items() if keep.get(name) is entry[0]}

    async def _publish_hosts(self, hosts: set[str], clusters: list[str], forwarded: dict[str, str] | None = None,
                             budget_headers: frozenset[str] = frozenset()) -> int:
        # the failover route names the failover clusters only; without rules with `retries` there is none
        clusters = [name for name in clusters if name.startswith(FAILOVER_ROUTE_PREFIXES)]
        body_limit = self.data_plane.body_limit
        return await self.routes.publish([
            to_route_proto(route_configuration(sorted(hosts), clusters=clusters, body_limit=body_limit,
                                               forwarded=forwarded, budget_headers=budget_headers,
                                               reader=self.data_plane.answer_reader)),
            to_route_proto(any_host_route_configuration(clusters, body_limit, budget_headers,
                                                        self.data_plane.answer_reader))])
