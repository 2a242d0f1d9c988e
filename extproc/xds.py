"""Cluster discovery (CDS, state of the world) for every Envoy that connects.

Each published version holds every provider cluster. A stream sends the newest version as
soon as Envoy asks and again whenever a newer one is published; Envoy's ACK (or NACK, with
its error) is recorded so the control plane can wait for Envoys to have a cluster before
routing traffic to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import AsyncIterator

from envoy.config.cluster.v3 import cluster_pb2
from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from google.protobuf import any_pb2

log = logging.getLogger("extproc.xds")

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"


class ClusterPublisher:
    """The current cluster set, versioned, and what each connected Envoy has acknowledged."""

    def __init__(self) -> None:
        self._version = 0
        self._resources: list[any_pb2.Any] = []
        self._changed = asyncio.Condition()
        self._acked: dict[int, int] = {}  # stream id -> last version acknowledged or rejected
        self._ids = itertools.count(1)

    @property
    def version(self) -> int:
        return self._version

    async def publish(self, clusters: list[cluster_pb2.Cluster]) -> int:
        resources = []
        for cluster in clusters:
            packed = any_pb2.Any()
            packed.Pack(cluster)
            resources.append(packed)
        async with self._changed:
            self._version += 1
            self._resources = resources
            self._changed.notify_all()
        log.info("clusters version %d: %s", self._version, ", ".join(c.name for c in clusters) or "(none)")
        return self._version

    async def wait_acked(self, version: int, timeout: float) -> bool:
        """Wait until every connected Envoy has answered `version` (or a later one)."""
        async def all_answered() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: all(v >= version for v in self._acked.values()))

        try:
            await asyncio.wait_for(all_answered(), timeout)
            return True
        except asyncio.TimeoutError:
            return False

    async def _snapshot_after(self, version: int) -> tuple[int, list[any_pb2.Any]]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._version > version)
            return self._version, self._resources

    async def _record(self, stream: int, version: int | None) -> None:
        async with self._changed:
            if version is None:
                self._acked.pop(stream, None)
            else:
                self._acked[stream] = version
            self._changed.notify_all()


class ClusterDiscovery(cds_pb2_grpc.ClusterDiscoveryServiceServicer):
    def __init__(self, publisher: ClusterPublisher):
        self._publisher = publisher

    async def StreamClusters(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context) -> None:
        stream = next(self._publisher._ids)
        first = await anext(request_iterator, None)
        if first is None:
            return
        node = first.node.id or "?"
        await self._publisher._record(stream, 0)
        log.info("envoy %s connected for clusters", node)
        reader = asyncio.ensure_future(self._read_answers(stream, node, request_iterator))
        sent = 0
        try:
            while not reader.done():
                waiter = asyncio.ensure_future(self._publisher._snapshot_after(sent))
                done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    break
                sent, resources = waiter.result()
                await context.write(discovery_pb2.DiscoveryResponse(
                    version_info=str(sent), resources=resources, type_url=CLUSTER_TYPE_URL, nonce=str(sent)))
        finally:
            reader.cancel()
            await self._publisher._record(stream, None)
            log.info("envoy %s disconnected from clusters", node)

    async def _read_answers(self, stream: int, node: str, request_iterator) -> None:
        async for request in request_iterator:
            if not request.response_nonce:
                continue
            version = int(request.response_nonce)
            if request.HasField("error_detail"):
                log.error("envoy %s rejected clusters version %d: %s", node, version, request.error_detail.message)
            await self._publisher._record(stream, version)
