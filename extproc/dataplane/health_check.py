"""gRPC health checks of the ext_proc port (Envoy's active health check of its ext_proc
cluster): SERVING, or NOT_SERVING while the process drains (`extproc.ops.drain`)."""

from __future__ import annotations

from collections.abc import Callable

# grpc.health.v1.HealthCheckResponse {status: SERVING (1) | NOT_SERVING (2)}, field 1 as a varint
_SERVING, _NOT_SERVING = b"\x08\x01", b"\x08\x02"


class HealthCheck:
    """One gRPC health check call (Envoy's active health check of the ext_proc cluster)."""

    __slots__ = ("_serving",)

    def __init__(self, serving: Callable[[], bool]):
        self._serving = serving

    def on_message(self, message: bytes) -> tuple[bytes, bool]:
        return (_SERVING if self._serving() else _NOT_SERVING), True
