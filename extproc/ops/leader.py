"""Leader election among `serve --kubernetes` replicas, on a `coordination.k8s.io` Lease.

Every replica serves the ext_proc and xDS from the same watched objects, so any one can answer
any Envoy; only writing the objects' `Accepted` conditions needs one writer, or replicas would
write the same status over each other. The leader holds the Lease by renewing it; the others
watch it, and take it over once it has not changed for its whole duration on their own clock
(never by comparing timestamps across machines, whose clocks may differ). The leader stops
writing before that can happen: when it has not renewed for two thirds of the duration. On
shutdown it gives the Lease up, so another replica takes over at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from .startup import home_namespace

log = logging.getLogger(__name__)

DEFAULT_LEASE_NAME = "llm-gateway-control"
DEFAULT_LEASE_DURATION_S = 15.0

CREATE, RENEW, TAKE, WAIT = "create", "renew", "take", "wait"


@dataclass(frozen=True)
class Seen:
    """The Lease as another replica last left it, and when (our monotonic clock) we first saw it so."""

    holder: str
    renewed: str  # the holder's renewTime, compared only for change
    since: float


def next_step(holder: str | None, renewed: str, me: str, seen: Seen | None, now: float,
              duration: float) -> tuple[str, Seen | None]:
    """What to do with the Lease as read now (`holder` None: there is no Lease)."""
    if holder is None:
        return CREATE, None
    if holder == me:
        return RENEW, None
    if holder == "":  # given up by its last holder
        return TAKE, None
    if seen is None or (seen.holder, seen.renewed) != (holder, renewed):
        return WAIT, Seen(holder, renewed, now)  # alive: it changed since we last looked
    if now - seen.since >= duration:
        return TAKE, None
    return WAIT, seen


def default_namespace() -> str:
    """The pod's own namespace, else "default"."""
    return home_namespace() or "default"


def identity() -> str:
    """The pod's name (its host name) and something unique to this process."""
    return f"{socket.gethostname()}_{os.getpid()}_{uuid.uuid4().hex[:6]}"


class LeaderElector:
    def __init__(self, namespace: str, name: str = DEFAULT_LEASE_NAME, duration_s: float = DEFAULT_LEASE_DURATION_S,
                 on_elected: Callable[[], None] | None = None, api=None, clock: Callable[[], float] = time.monotonic):
        if api is None:
            from kubernetes import client

            api = client.CoordinationV1Api()
        self._api = api
        self.namespace, self.name, self.duration = namespace, name, duration_s
        self.me = identity()
        self._on_elected = on_elected
        self._clock = clock
        self._seen: Seen | None = None
        self._renewed_at: float | None = None  # our last successful create, renew or take

    def is_leader(self) -> bool:
        """True while our last renewal is recent enough that no other replica can have taken over."""
        return self._renewed_at is not None and self._clock() - self._renewed_at < self.duration * 2 / 3

    async def run(self) -> None:
        while True:
            was = self.is_leader()
            try:
                await asyncio.to_thread(self._round)
            except Exception as exc:  # the API server unreachable, a conflict: try again next round
                log.warning("lease %s/%s: %s", self.namespace, self.name, _short(exc))
            now = self.is_leader()
            if now and not was:
                log.info("elected leader (lease %s/%s, identity %s): writing status conditions",
                         self.namespace, self.name, self.me)
                if self._on_elected is not None:
                    self._on_elected()
            elif was and not now:
                log.warning("no longer the leader (lease %s/%s): status conditions left to the new one",
                            self.namespace, self.name)
            await asyncio.sleep(self.duration / 3 if now else self.duration / 5)

    def _round(self) -> None:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        try:
            lease = self._api.read_namespaced_lease(self.name, self.namespace)
        except ApiException as exc:
            if exc.status != 404:
                raise
            lease = None
        spec = lease.spec if lease is not None else None
        holder = None if spec is None else (spec.holder_identity or "")
        renewed = "" if spec is None or spec.renew_time is None else str(spec.renew_time)
        step, self._seen = next_step(holder, renewed, self.me, self._seen, self._clock(), self.duration)
        if step == WAIT:
            self._renewed_at = None
            return
        started = self._clock()
        stamp = datetime.now(UTC)
        if step == CREATE:
            self._api.create_namespaced_lease(self.namespace, client.V1Lease(
                metadata=client.V1ObjectMeta(name=self.name, namespace=self.namespace),
                spec=client.V1LeaseSpec(holder_identity=self.me, lease_duration_seconds=int(round(self.duration)),
                                        acquire_time=stamp, renew_time=stamp, lease_transitions=0)))
        else:
            assert spec is not None  # a Lease was read: RENEW and TAKE follow from its holder
            if step == TAKE:
                spec.holder_identity = self.me
                spec.acquire_time = stamp
                spec.lease_transitions = (spec.lease_transitions or 0) + 1
            spec.lease_duration_seconds = int(round(self.duration))
            spec.renew_time = stamp
            # carries the resourceVersion we read: another replica's write in between makes this a 409
            self._api.replace_namespaced_lease(self.name, self.namespace, lease)
        self._renewed_at = started

    async def release(self) -> None:
        """Give the Lease up (on shutdown), so another replica need not wait for it to expire."""
        if not self.is_leader():
            return
        self._renewed_at = None
        try:
            await asyncio.to_thread(self._give_up)
            log.info("lease %s/%s released", self.namespace, self.name)
        except Exception as exc:
            log.warning("could not release lease %s/%s: %s", self.namespace, self.name, _short(exc))

    def _give_up(self) -> None:
        lease = self._api.read_namespaced_lease(self.name, self.namespace)
        if lease.spec.holder_identity != self.me:
            return
        lease.spec.holder_identity = ""
        lease.spec.lease_duration_seconds = 1
        lease.spec.renew_time = datetime.now(UTC)
        self._api.replace_namespaced_lease(self.name, self.namespace, lease)


def _short(exc: Exception) -> str:
    status = getattr(exc, "status", None)
    return f"{status} {getattr(exc, 'reason', '')}" if status else f"{type(exc).__name__}: {exc}"[:200]
