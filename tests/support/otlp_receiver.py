"""A real OTLP gRPC trace receiver for the tests: the collector's TraceService (from the
opentelemetry-proto package) on grpcio, keeping every span it is sent. `delay_s` makes it a slow
collector (each export waits that long before answering)."""

from __future__ import annotations

import threading
import time
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

from extproc.testing.ports import free_port


def _value(any_value):
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, delay_s: float = 0.0):
        self.delay_s = delay_s
        self.port = free_port()
        self.spans: list[dict] = []
        self.resources: list[dict] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self._server.add_insecure_port(f"127.0.0.1:{self.port}")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OtlpReceiver:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(0)

    def Export(self, request, context):  # noqa: N802 - the gRPC method's name
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            for resource_spans in request.resource_spans:
                resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
                self.resources.append(resource)
                for scope in resource_spans.scope_spans:
                    for span in scope.spans:
                        self.spans.append({
                            "name": span.name, "trace_id": span.trace_id.hex(), "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(), "kind": span.kind,
                            "status": span.status.code, "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano, "scope": scope.scope.name,
                            "attributes": {a.key: _value(a.value) for a in span.attributes}})
        return trace_service_pb2.ExportTraceServiceResponse()

    def received(self) -> list[dict]:
        with self._lock:
            return list(self.spans)
