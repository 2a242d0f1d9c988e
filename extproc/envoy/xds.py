"""xDS, state of the world, for every Envoy that connects: clusters (CDS) and, for sidecars, the
route configuration (RDS) that lists the LLM host names.

Each publisher holds the current resources of one type, versioned. A stream sends the newest
version as soon as Envoy asks and again whenever a newer one is published; Envoy's ACK (or
NACK, with its error) is recorded, so the control plane can wait until Envoys have a cluster
or a host before the ext_proc routes traffic to it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator

from envoy.service.cluster.v3 import cds_pb2_grpc
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.route.v3 import rds_pb2_grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message

log = logging.getLogger(__name__)

CLUSTER_TYPE_URL = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ROUTE_TYPE_URL = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
LISTED = 10  # resource names a version's log line lists (a config may have thousands)


class Publisher:
    """The current resources of one type, versioned, and what each connected Envoy has answered."""

    def __init__(self, type_url: str, what: str) -> None:
        self.type_url = type_url
        self._what = what
        self._version = 0
        self._resources: list[any_pb2.Any] = []
        self._changed = asyncio.Condition()
        self._answered: dict[int, int] = {}  # stream id -> last version acknowledged or rejected
        self._ids = itertools.count(1)

    @property
    def version(self) -> int:
        return self._version

    async def publish(self, resources: list[Message]) -> int:
        packed = []
        for resource in resources:
            item = any_pb2.Any()
            item.Pack(resource)
            packed.append(item)
        async with self._changed:
            self._version += 1
            self._resources = packed
            self._changed.notify_all()
        names = [getattr(r, "name", "?") for r in resources]
        listed = ", ".join(names[:LISTED]) + (f" and {len(names) - LISTED} more" if len(names) > LISTED else "")
        log.info("%s version %d: %s", self._what, self._version, listed or "(none)")
        return self._version

    async def wait_answered(self, version: int, timeout: float) -> bool:
        """Wait until every connected Envoy has answered `version` (or a later one)."""
        async def all_answered() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: all(v >= version for v in self._answered.values()))

        try:
            await asyncio.wait_for(all_answered(), timeout)
            return True
        except TimeoutError:
            return False

    async def _snapshot_after(self, version: int) -> tuple[int, list[any_pb2.Any]]:
        async with self._changed:
            await self._changed.wait_for(lambda: self._version > version)
            return self._version, self._resources

    async def _record(self, stream: int, version: int | None) -> None:
        async with self._changed:
            if version is None:
                self._answered.pop(stream, None)
            else:
                self._answered[stream] = version
            self._changed.notify_all()

    async def serve(self, request_iterator: AsyncIterator[discovery_pb2.DiscoveryRequest], context) -> None:
        """One Envoy's stream: answer its request, then push every newer version."""
        stream = next(self._ids)
        first = await anext(request_iterator, None)
        if first is None:
            return
        node = first.node.id or "?"
        await self._record(stream, 0)
        log.info("envoy %s connected for %s", node, self._what)
        reader = asyncio.ensure_future(self._read_answers(stream, node, request_iterator))
        sent = 0
        try:
            while not reader.done():
                waiter = asyncio.ensure_future(self._snapshot_after(sent))
                done, _ = await asyncio.wait({waiter, reader}, return_when=asyncio.FIRST_COMPLETED)
                if waiter not in done:
                    waiter.cancel()
                    break
                sent, resources = waiter.result()
                await context.write(discovery_pb2.DiscoveryResponse(
                    version_info=str(sent), resources=resources, type_url=self.type_url, nonce=str(sent)))
        finally:
            reader.cancel()
            await self._record(stream, None)
            log.info("envoy %s disconnected from %s", node, self._what)

    async def _read_answers(self, stream: int, node: str, request_iterator) -> None:
        async for request in request_iterator:
            if not request.response_nonce:
                continue
            version = int(request.response_nonce)
            if request.HasField("error_detail"):
                log.error("envoy %s rejected %s version %d: %s", node, self._what, version,
                          request.error_detail.message)
            await self._record(stream, version)


class ClusterDiscovery(cds_pb2_grpc.ClusterDiscoveryServiceServicer):
    def __init__(self, publisher: Publisher):
        self._publisher = publisher

    async def StreamClusters(self, request_iterator, context) -> None:
        await self._publisher.serve(request_iterator, context)


class RouteDiscovery(rds_pb2_grpc.RouteDiscoveryServiceServicer):
    def __init__(self, publisher: Publisher):
        self._publisher = publisher

    async def StreamRoutes(self, request_iterator, context) -> None:
        await self._publisher.serve(request_iterator, context)
