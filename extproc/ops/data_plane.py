"""The data plane of one process, built in one place: what answers Envoy per request (the
ext_proc, the retry processor, the answer exchange, the access-log receiver, health checks) and the state behind it
(the routing table in force, body memory, budgets, passive health, metrics).

The single process (`up`, `serve`) and each worker process (`serve --workers N`) build it the
same way, here; only where it listens differs (a Unix socket, or a TCP port the workers share).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from ..dataplane import grpc_h2
from ..dataplane.accesslog_receiver import AccessLogReceiver
from ..dataplane.answer_check import AnswerGuards
from ..dataplane.answer_exchange import AnswerProcessor
from ..dataplane.authentication import Authenticator
from ..dataplane.data_protection import ProtectionMetrics
from ..dataplane.endpoint_scraper import EndpointScraper
from ..dataplane.grpc_h2 import Call, H2Connection
from ..dataplane.headers_only import headers_only_path
from ..dataplane.health_check import HealthCheck
from ..dataplane.judge_client import JudgeClient, JudgeReach
from ..dataplane.peer_callers import PeerCallers
from ..dataplane.processor import ExternalProcessor
from ..dataplane.retry_processor import RetryRewriter
from ..dataplane.trace_contents import TraceContents, capture_contents
from ..envoy.answer_reader import CONTENTS, FINISH
from ..envoy.clusters import UpstreamOptions
from ..policy.body_memory import DEFAULT_MAX_BODY_BYTES_IN_FLIGHT, Inflight, register_metrics
from ..policy.budget_gate import BudgetGate
from ..policy.caller import LOCAL, Caller
from ..policy.endpoint_state import EndpointMetrics, EndpointObserver, EndpointState
from ..policy.passive_health import AttemptObserver, PassiveHealth
from ..policy.table import RoutingTable, TableHolder
from ..protocol import (
    ANSWER_AUTHORITY,
    DEFAULT_BODY_LIMIT,
    HEALTH_CHECK,
    PROCESS,
    RETRY_AUTHORITY,
    STREAM_ACCESS_LOGS,
)
from ..telemetry.metrics import GatewayMetrics
from ..telemetry.spans import SpanQueue, SpanSink, gateway_resource, start_export
from ..telemetry.spend_redis import SpendWriter
from ..telemetry.trace_context import sampler_from_env
from .malloc import give_back_free_heap

log = logging.getLogger(__name__)

# A body chunk may be larger than the body limit (Envoy sends what it has read, up to its buffer
# limit); the ext_proc answers a body over the limit with a 413 itself.
CHUNK_MARGIN = 4 << 20


class DataPlane:
    """One process's data plane. `worker` names the process in the per-process metric series
    (0: the main one). `judges`: how data policies' judges are reached (as Envoy reaches
    providers: `judge_reach`)."""

    def __init__(self, holder: TableHolder, body_limit: int = DEFAULT_BODY_LIMIT,
                 max_body_bytes_in_flight: int = DEFAULT_MAX_BODY_BYTES_IN_FLIGHT,
                 redis_url: str | None = None, redis_fail_closed: bool = False, worker: int = 0,
                 otlp_endpoint: str | None = None, local: Caller = LOCAL, judges: JudgeReach | None = None,
                 peers: PeerCallers | None = None):
        self.holder = holder
        self.local = local  # the caller on a Unix socket: as the operator states it (--source-labels)
        # an egress gateway with mutual TLS: each request's caller is its client certificate's workload
        self.peers = peers
        self.body_limit = body_limit
        self.inflight = Inflight(max_body_bytes_in_flight, give_back_free_heap)
        self.metrics = GatewayMetrics()
        register_metrics(self.metrics.registry, self.inflight, str(worker))
        self.budgets = BudgetGate(self.metrics.registry, lambda: self.holder.table, redis_url, redis_fail_closed)
        # where budgets share a Redis, so does spend: who spent what across every instance
        self.spend_writer = (SpendWriter(self.metrics.spend, redis_url, self.metrics.registry)
                             if redis_url is not None else None)
        self.health = PassiveHealth()  # failover's passive health, fed by the access log
        self.health.configure(holder.table.health)
        self.started = False  # start() ran: background tasks may run
        self.draining = False  # set by a graceful drain: health checks say NOT_SERVING
        self.connections: set[H2Connection] = set()  # open HTTP/2 connections from Envoys
        self.server: asyncio.Server | None = None
        attempts = AttemptObserver(self.health, self.metrics.registry, hosts=lambda: self.holder.table.cluster_hosts)
        # traces only where an exporter is configured: otherwise nothing is done per request
        self.spans: SpanQueue | None = start_export(otlp_endpoint, self.metrics.registry) if otlp_endpoint else None
        # prompt and answer contents in spans, masked: only where an operator turned them on
        contents = (TraceContents(lambda: self.holder.table)
                    if self.spans is not None and capture_contents() else None)
        sink = (SpanSink(self.spans.put, gateway_resource(), lambda: self.holder.table.cluster_hosts,
                         contents.attributes if contents is not None else None)
                if self.spans is not None else None)
        # Envoy's answer reader (finish reason, contents), turned on by the routes where traces are exported
        self.answer_reader = None if self.spans is None else CONTENTS if contents is not None else FINISH
        protection = ProtectionMetrics(self.metrics.registry)  # LLMDataPolicy's counts, prompts and answers
        reach = judges or JudgeReach()
        self.judges = JudgeClient(lambda: self.holder.table, reach.ca_file, reach.resolve)
        # pools of in-cluster model servers: what the endpoint picker knows, scraped while there are any
        self.endpoints = EndpointState()
        EndpointMetrics(self.endpoints, time.time, self.metrics.registry)
        self.scraper = EndpointScraper(self.endpoints, lambda: self.holder.table.pools)
        self._scraping: asyncio.Task[None] | None = None
        processor = ExternalProcessor(holder, body_limit=body_limit, budgets=self.budgets, inflight=self.inflight,
                                      health=self.health, tracing=sampler_from_env() if sink is not None else None,
                                      protection=protection, contents=contents, judges=self.judges, peers=peers,
                                      endpoints=self.endpoints, headers_only=headers_only_path())
        retries = RetryRewriter(holder, body_limit)
        # answers turned into the client's format, or checked by a data policy
        answer = AnswerProcessor(self.inflight, AnswerGuards(holder, protection))
        receiver = AccessLogReceiver(self.metrics, self.budgets, attempts, sink, table=lambda: self.holder.table,
                                     entry_callers=peers is not None,
                                     endpoints=EndpointObserver(self.endpoints, lambda: self.holder.table.pools,
                                                                lambda: self.holder.table.cluster_hosts))
        self.methods: dict[str, Callable[[Caller | None], Call]] = {
            PROCESS: processor.exchange,
            RETRY_AUTHORITY + PROCESS: lambda _caller: retries.exchange(),
            ANSWER_AUTHORITY + PROCESS: answer.exchange,
            STREAM_ACCESS_LOGS: receiver.call,
            HEALTH_CHECK: lambda _caller: HealthCheck(lambda: not self.draining),
        }

    def switch(self, table: RoutingTable) -> None:
        """The routing table every new request is decided over from now on."""
        self.holder.table = table
        self.health.configure(table.health)
        if table.pools and self._scraping is None and self.started:
            self._scraping = asyncio.get_running_loop().create_task(self.scraper.run())

    async def start(self) -> None:
        await self.budgets.start()
        if self.spend_writer is not None:
            await self.spend_writer.start()
        self.started = True
        if self.holder.table.pools and self._scraping is None:
            self._scraping = asyncio.create_task(self.scraper.run())

    async def listen_tcp(self, host: str, port: int, authenticator: Authenticator | None,
                         reuse_port: bool = False) -> int:
        """Serves on TCP (every stream proves its caller to `authenticator`); the port taken."""
        self.server = await grpc_h2.serve(host, port, self.methods, self.body_limit + CHUNK_MARGIN, authenticator,
                                          self.connections, reuse_port)
        port = int(self.server.sockets[0].getsockname()[1])
        log.info("ext_proc and access log service listening on %s:%d", host, port)
        return port

    async def listen_unix(self, path: str) -> None:
        """Serves on a Unix socket (local mode: the caller is local)."""
        self.server = await grpc_h2.serve_unix(path, self.methods, self.body_limit + CHUNK_MARGIN, self.connections,
                                               self.local)
        log.info("ext_proc and access log service listening on unix:%s", path)

    def stop_listening(self) -> None:
        """No new connections; those open stay (a graceful drain sends them GOAWAY)."""
        if self.server is not None:
            self.server.close()

    async def stop(self) -> None:
        self.stop_listening()
        if self._scraping is not None:
            self._scraping.cancel()
            self._scraping = None
        await self.budgets.stop()
        if self.spend_writer is not None:  # what was counted since the last flush, sent
            await self.spend_writer.stop()
        await self.judges.close()
        if self.spans is not None:
            await asyncio.to_thread(self.spans.stop)


def judge_reach(upstream: UpstreamOptions) -> JudgeReach:
    """Judges are reached as Envoy reaches providers: the same trust store and `--resolve` addresses."""
    return JudgeReach(upstream.ca_file, {host: (to.host, to.port) for host, to in upstream.resolve.items()})
