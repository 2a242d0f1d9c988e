"""Who is calling an egress gateway: per request, the workload its client certificate names.

The gateway's Envoy takes only mutual TLS from the sidecars, with a client certificate chained
to the control plane's CA (`extproc.envoy.secrets`), and tells its ext_proc, with each request's
headers, that certificate's SPIFFE ID and subject (attributes Envoy computes from the verified
connection, `extproc.protocol`: never a header, so nothing the application sends can stand in).
Here they become the `Caller` the request is decided for (`extproc.policy.peer_identity`), with
the pod's labels and workload from this process's own pod watch
(`extproc.dataplane.workload_identity`), as a sidecar's control plane has them.

A sidecar's requests share one connection and so one pair of strings: the caller is worked out
once per pair and kept (the same object for every request, so what is worked out per caller and
table is too). A pod not seen yet is read off the event loop; meanwhile its labels are unknown,
which fails closed (`caller_unresolved`) wherever a decision depends on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from ..policy.caller import Caller
from ..policy.peer_identity import WorkloadName, parse_peer
from ..protocol import ATTRIBUTES_KEY, PEER_SUBJECT_ATTRIBUTE, PEER_URI_ATTRIBUTE
from .workload_identity import PodDirectory

log = logging.getLogger(__name__)

MAX_PEERS = 50_000  # distinct certificates kept; past it the cache starts again


class PeerCallers:
    """The callers of an egress gateway, from their client certificates. `pods`: the pod watch
    (Kubernetes); without one (files), a caller bound to a pod has unknown labels."""

    def __init__(self, pods: PodDirectory | None = None, clock: Callable[[], float] = time.time):
        self.pods = pods
        self._clock = clock
        self._names: dict[tuple[str, str], WorkloadName | None] = {}
        self._callers: dict[WorkloadName, Caller] = {}  # without a pod, or with labels not known (yet)
        self._fetching: set[str] = set()

    def of(self, request: pb.ProcessingRequest) -> Caller | None:
        """The caller of a request's headers message, or None: no client certificate of ours."""
        if ATTRIBUTES_KEY not in request.attributes:
            return None
        fields = request.attributes[ATTRIBUTES_KEY].fields
        uri, subject = fields.get(PEER_URI_ATTRIBUTE), fields.get(PEER_SUBJECT_ATTRIBUTE)
        if uri is None or subject is None:
            return None
        return self.caller(uri.string_value, subject.string_value)

    def caller(self, uri: str, subject: str) -> Caller | None:
        key = (uri, subject)
        try:
            name = self._names[key]
        except KeyError:
            if len(self._names) >= MAX_PEERS:
                self._names.clear()
                self._callers.clear()
            name = self._names[key] = parse_peer(uri, subject)
            if name is None:
                log.warning("refused a client certificate that names no workload of the mesh: %r", uri[:200])
        if name is None:
            return None
        if name.pod is None or name.uid is None:
            return self._kept(name, known=True)
        if self.pods is not None:
            found = self.pods.caller(name.namespace, name.account, name.pod, name.uid, self._clock())
            if found is None and self._fetch(name):
                found = self.pods.caller(name.namespace, name.account, name.pod, name.uid, self._clock())
            if found is not None:
                return found
        return self._kept(name, known=False)

    def _kept(self, name: WorkloadName, known: bool) -> Caller:
        """A caller without a pod (no labels), or a pod's whose labels are not known: kept."""
        caller = self._callers.get(name)
        if caller is None:
            caller = self._callers[name] = (Caller(name.namespace, name.account) if known else
                                            Caller(name.namespace, name.account, name.pod, None, None, name.uid))
        return caller

    def _fetch(self, name: WorkloadName) -> bool:
        """Reads a pod not seen yet, in a thread: its next request has its labels. True when it
        was read now (no event loop: a test, a tool)."""
        pods, uid = self.pods, name.uid
        if pods is None or uid is None or name.pod is None or uid in self._fetching:
            return False
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            pods.fetch(name.namespace, name.pod, uid)
            return True
        self._fetching.add(uid)
        future = loop.run_in_executor(None, pods.fetch, name.namespace, name.pod, uid)
        future.add_done_callback(lambda _f: self._fetching.discard(uid))
        return False
