"""OpenTelemetry spans built from Envoy's access log, exported over OTLP (docs/tracing.md,
decision 0006).

A sampled request carries its trace's ids in its dynamic metadata (the ext_proc chose them and
sent each attempt's `traceparent` to the provider; see `extproc.telemetry.trace_context`). When
its access-log entry arrives, it becomes a SERVER span for the whole request (child of the
client's span, when the client sent one) and a CLIENT span per provider attempt: the failed
attempts of a failed-over request come as the router's upstream entries just before it, the
attempt that answered is read from the request's own entry. Every span carries the GenAI
semantic conventions' attributes and the gateway's own (route, rule, caller, cost).

Export never touches a request: spans go into a bounded queue that a thread sends in batches
(the OTLP gRPC exporter of the OpenTelemetry SDK, configured by `--otlp-endpoint` or the standard
`OTEL_EXPORTER_OTLP_*` variables). A full queue drops spans, counted in
`llm_gateway_trace_spans_dropped_total`; a collector that is slow or gone only makes the queue
fill. Without an exporter none of this exists: the receiver gets no `SpanSink`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from envoy.data.accesslog.v3 import accesslog_pb2
from google.protobuf import duration_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags
from prometheus_client import CollectorRegistry

from ..protocol import FINISH_REASON_KEY, METADATA_NAMESPACE, host_of_cluster
from .fast_series import Counter
from .metrics import RequestRecord
from .trace_context import attempt_span_id

log = logging.getLogger(__name__)

SCOPE = InstrumentationScope("llm-gateway")
Attribute = str | int | float | bool | tuple[str, ...]  # a span attribute's value
SAMPLED = TraceFlags(TraceFlags.SAMPLED)
MAX_PENDING = 10_000  # failed attempts waiting for their request's entry
DEFAULT_QUEUE = 2048  # spans waiting for export (OTEL_BSP_MAX_QUEUE_SIZE)
DEFAULT_BATCH = 512  # spans per export call (OTEL_BSP_MAX_EXPORT_BATCH_SIZE)
DEFAULT_DELAY_S = 1.0  # between exports when the queue is short (OTEL_BSP_SCHEDULE_DELAY, ms)


@dataclass(frozen=True, slots=True)
class _Attempt:
    """A failed attempt of a failed-over request, as its upstream entry told it."""

    host: str
    status: int
    reason: str
    start_ns: int
    end_ns: int


def _nanos(duration: duration_pb2.Duration) -> int:
    return int(duration.seconds) * 1_000_000_000 + int(duration.nanos)


def _start_ns(common: accesslog_pb2.AccessLogCommon) -> int:
    return int(common.start_time.seconds) * 1_000_000_000 + int(common.start_time.nanos)


class SpanSink:
    """Turns access-log entries into spans and hands them to `export` (a `SpanQueue`'s `put`)."""

    def __init__(self, export: Callable[[ReadableSpan], None], resource: Resource,
                 hosts: Callable[[], Mapping[str, str]] = dict,
                 contents: Callable[[accesslog_pb2.HTTPAccessLogEntry, RequestRecord], Mapping[str, str]] | None
                 = None):
        self._export = export
        self._resource = resource
        self._hosts = hosts  # provider cluster -> provider host, of the config in force
        # where contents are captured: the request span's masked prompt and answer (extproc.dataplane.trace_contents)
        self._contents = contents
        self._pending: OrderedDict[str, list[_Attempt]] = OrderedDict()

    def _host(self, cluster: str) -> str:
        return self._hosts().get(cluster) or host_of_cluster(cluster) or cluster

    def attempt(self, entry: accesslog_pb2.HTTPAccessLogEntry) -> None:
        """A failed attempt (the router's upstream entry): kept until its request's entry."""
        request_id = entry.request.request_id
        if not request_id:
            return
        common = entry.common_properties
        start = _start_ns(common)
        first = _nanos(common.time_to_first_upstream_tx_byte)
        last = _nanos(common.time_to_last_upstream_rx_byte) or _nanos(common.duration)
        flags = common.response_flags
        reason = ("timeout" if flags.upstream_request_timeout else
                  "connect_failure" if flags.upstream_connection_failure else
                  "reset" if flags.upstream_remote_reset or flags.upstream_connection_termination else "")
        self._pending.setdefault(request_id, []).append(_Attempt(
            self._host(common.upstream_cluster), entry.response.response_code.value, reason,
            start + first, start + max(last, first)))
        while len(self._pending) > MAX_PENDING:
            self._pending.popitem(last=False)

    def request(self, entry: accesslog_pb2.HTTPAccessLogEntry, record: RequestRecord) -> None:
        """A finished request: its span and its attempts' spans, if the request was sampled."""
        failed = self._pending.pop(entry.request.request_id, []) if self._pending else []
        common = entry.common_properties
        meta = common.metadata.filter_metadata.get(METADATA_NAMESPACE)
        if meta is None or "span_id" not in meta.fields:
            return
        fields = meta.fields
        trace_id = int(fields["trace_id"].string_value, 16)
        span_hex = fields["span_id"].string_value
        parent_hex = fields["parent_span_id"].string_value if "parent_span_id" in fields else ""
        context = SpanContext(trace_id, int(span_hex, 16), False, SAMPLED)
        parent = SpanContext(trace_id, int(parent_hex, 16), True, SAMPLED) if parent_hex else None
        start = _start_ns(common)
        end = start + (_nanos(common.duration) or _nanos(common.time_to_last_downstream_tx_byte))
        name = f"{record.operation} {record.request_model}".strip()
        gen_ai = {"gen_ai.operation.name": record.operation, "gen_ai.provider.name": record.provider_host,
                  "gen_ai.request.model": record.request_model}
        attributes: dict[str, Attribute] = {
            **gen_ai, "llm_gateway.route": record.route, "llm_gateway.rule": record.rule,
            "llm_gateway.provider": record.provider, "llm_gateway.caller": record.caller,
            "llm_gateway.outcome": record.outcome, "llm_gateway.stream": record.stream,
            "llm_gateway.attempts": len(failed) + 1, "http.response.status_code": record.status}
        usage = _usage(record)
        finish = fields.get(FINISH_REASON_KEY)  # Envoy's answer reader (extproc.envoy.answer_reader)
        if finish is not None:
            usage["gen_ai.response.finish_reasons"] = (finish.string_value,)
        attributes.update(usage)
        if self._contents is not None:
            attributes.update(self._contents(entry, record))
        if record.ttft_s is not None:
            attributes["gen_ai.server.time_to_first_token"] = record.ttft_s
        if record.tpot_s is not None:
            attributes["gen_ai.server.time_per_output_token"] = record.tpot_s
        if record.currency:
            attributes["llm_gateway.cost.currency"] = record.currency
            if record.cost is not None:
                attributes["llm_gateway.cost"] = record.cost / 1e12
        elif usage:
            attributes["llm_gateway.cost.unpriced"] = True
        if record.error_type:
            attributes["error.type"] = record.error_type
        status = Status(StatusCode.ERROR, record.error_type) if record.outcome not in ("success",) else Status()
        spans = [ReadableSpan(name, context, parent, self._resource, attributes, kind=SpanKind.SERVER,
                              status=status, start_time=start, end_time=max(end, start),
                              instrumentation_scope=SCOPE)]
        for number, attempt in enumerate(failed, start=1):
            attempt_attributes: dict[str, Attribute] = {
                **gen_ai, "gen_ai.provider.name": attempt.host, "server.address": attempt.host,
                "llm_gateway.attempt": number, "llm_gateway.route": record.route}
            if attempt.status:
                attempt_attributes["http.response.status_code"] = attempt.status
            error = attempt_attributes["error.type"] = attempt.reason or str(attempt.status)
            spans.append(self._attempt_span(name, trace_id, span_hex, number, context, attempt_attributes,
                                            Status(StatusCode.ERROR, error),
                                            attempt.start_ns, attempt.end_ns))
        if common.upstream_cluster:  # the attempt that answered (or the last one)
            number = len(failed) + 1
            first = _nanos(common.time_to_first_upstream_tx_byte)
            last = _nanos(common.time_to_last_upstream_rx_byte) or (end - start)
            final: dict[str, Attribute] = {
                **gen_ai, **usage, "gen_ai.provider.name": record.provider_host,
                "server.address": record.provider_host, "llm_gateway.attempt": number,
                "llm_gateway.route": record.route, "http.response.status_code": record.status}
            if record.response_model:
                final["gen_ai.response.model"] = record.response_model
            spans.append(self._attempt_span(name, trace_id, span_hex, number, context, final, status,
                                            start + first, start + max(last, first)))
        for span in spans:
            self._export(span)

    def _attempt_span(self, name: str, trace_id: int, span_hex: str, number: int, parent: SpanContext,
                      attributes: dict[str, Attribute], status: Status, start: int,
                      end: int) -> ReadableSpan:
        context = SpanContext(trace_id, int(attempt_span_id(span_hex, number), 16), False, SAMPLED)
        return ReadableSpan(name, context, parent, self._resource, attributes, kind=SpanKind.CLIENT, status=status,
                            start_time=start, end_time=max(end, start), instrumentation_scope=SCOPE)


def _usage(record: RequestRecord) -> dict[str, Attribute]:
    usage: dict[str, Attribute] = {}
    if record.response_model:
        usage["gen_ai.response.model"] = record.response_model
    if record.prompt_tokens is not None:
        usage["gen_ai.usage.input_tokens"] = record.prompt_tokens
    if record.completion_tokens is not None:
        usage["gen_ai.usage.output_tokens"] = record.completion_tokens
    if record.cached_tokens is not None:
        usage["gen_ai.usage.cache_read.input_tokens"] = record.cached_tokens
    return usage


class SpanQueue:
    """A bounded queue of finished spans and the thread that exports them in batches. Put never
    blocks: past `max_size` a span is dropped and counted. The SDK's batch processor does the
    same but logs a warning per dropped span and counts drops only through its own meter."""

    def __init__(self, exporter: SpanExporter, registry: CollectorRegistry, max_size: int = DEFAULT_QUEUE,
                 batch: int = DEFAULT_BATCH, delay_s: float = DEFAULT_DELAY_S):
        self._exporter = exporter
        self._queue: deque[ReadableSpan] = deque()
        self._max, self._batch, self._delay = max_size, batch, delay_s
        self._wake = threading.Event()
        self._stopping = False
        spans = Counter("llm_gateway_trace_spans", "Spans by what became of them: exported, failed (the collector "
                                                   "refused or did not answer), dropped (the queue was full)",
                        ("result",), registry=registry)
        self._exported, self._failed, self._dropped = (spans.labels(r) for r in ("exported", "failed", "dropped"))
        self._thread = threading.Thread(target=self._run, name="otlp-spans", daemon=True)
        self._thread.start()

    def put(self, span: ReadableSpan) -> None:
        if len(self._queue) >= self._max:
            self._dropped.inc()
            return
        self._queue.append(span)
        if len(self._queue) >= self._batch:
            self._wake.set()

    def _run(self) -> None:
        while not self._stopping:
            self._wake.wait(self._delay)
            self._wake.clear()
            self._send()
        self._send()

    def _send(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._batch, len(self._queue)))]
            try:
                result = self._exporter.export(batch)
            except Exception:  # an exporter bug must not end the thread
                log.exception("cannot export spans")
                result = SpanExportResult.FAILURE
            (self._exported if result == SpanExportResult.SUCCESS else self._failed).inc(len(batch))
            if result != SpanExportResult.SUCCESS or self._stopping:
                return  # try again after the delay, not in a tight loop against a dead collector

    def stop(self, timeout_s: float = 2.0) -> None:
        """Send what is queued (for at most `timeout_s`), then stop."""
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)
        try:
            self._exporter.shutdown()
        except Exception:
            pass


def _env_int(name: str, default: int) -> int:
    try:
        return max(int(os.environ.get(name, default)), 1)
    except ValueError:
        return default


def tracing_endpoint(flag: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """Where spans go: `--otlp-endpoint`, else the standard variables; None: no traces (also
    with OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    return flag or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or None


# what to run when xds-protos's older copy of the OpenTelemetry protos replaced opentelemetry-proto's
# (both wheels ship opentelemetry/proto/...; whichever pip installs last wins)
REPAIR_OTEL_PROTO = "pip install --force-reinstall --no-deps opentelemetry-proto=={version}"


def exporter_problem() -> str | None:
    """Why spans could not be exported, in one line with its fix; None when the exporter loads.

    xds-protos ships an old copy of `opentelemetry/proto` (before InstrumentationScope) at the same
    paths as opentelemetry-proto, so a fresh `pip install` can leave the OTLP exporter unimportable.
    Said at start, with the command that restores the files, instead of a worker's traceback."""
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter  # noqa: F401
    except ImportError as exc:
        from importlib.metadata import PackageNotFoundError, version

        try:
            fix = REPAIR_OTEL_PROTO.format(version=version("opentelemetry-proto"))
        except PackageNotFoundError:
            fix = "pip install opentelemetry-exporter-otlp-proto-grpc"
        return f"--otlp-endpoint: the OTLP exporter does not load ({exc}); repair the install with: {fix}"
    return None


def start_export(endpoint: str, registry: CollectorRegistry) -> SpanQueue:
    """The OTLP gRPC exporter for `endpoint` (its headers, timeout, TLS and compression from the
    standard OTEL_EXPORTER_OTLP_* variables), behind a bounded queue sized by OTEL_BSP_*."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    exporter = OTLPSpanExporter(endpoint=endpoint)
    return SpanQueue(exporter, registry, _env_int("OTEL_BSP_MAX_QUEUE_SIZE", DEFAULT_QUEUE),
                     _env_int("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", DEFAULT_BATCH),
                     _env_int("OTEL_BSP_SCHEDULE_DELAY", int(DEFAULT_DELAY_S * 1000)) / 1000)


def gateway_resource() -> Resource:
    """The gateway as the spans' resource: OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES honoured,
    `llm-gateway` where they name no service."""
    resource = Resource.create()
    if str(resource.attributes.get("service.name", "")).startswith("unknown_service"):
        resource = resource.merge(Resource({"service.name": "llm-gateway"}))
    return resource
