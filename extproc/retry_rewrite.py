"""A retried attempt, rewritten for the provider it goes to (docs/failover.md).

The first attempt is rewritten by the request's own ext_proc exchange (`extproc.server`), in
its one round trip. When Envoy retries, the failover route sends attempt N to the N-th cluster
of the attempt order, and that cluster's upstream ext_proc (skipped on attempt 1) asks here:
the attempt's headers (order, attempt count) and the body the previous attempt sent come in;
that provider's path, host, key, model and stream go out. Only retries pay this round trip.
The answer never carries another provider's key: every attempt sets (or removes) its own.
"""

from __future__ import annotations

import logging

from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

from .errors import GatewayError
from .failover import Failover, RetryPolicy, attempt_order
from .failover_envoy import NO_PROVIDER_CLUSTER, next_header
from .names import METADATA_NAMESPACE, ORDER_HEADER
from .rewrite import rewrite_body
from .routing import RoutingTable, Target

log = logging.getLogger("extproc.retry")

_OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD


def _header(key: str, value: str) -> base_pb2.HeaderValueOption:
    return base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key=key, raw_value=value.encode()),
                                      append_action=_OVERWRITE)


def first_attempt(failover: Failover, picked: int, cooling) -> tuple[Target, list[base_pb2.HeaderValueOption]]:
    """The first target of a request with retries and its headers (attempt order, retry policy),
    built once per weighted pick and set of providers cooling down, and kept on the rule."""
    key = (picked, tuple(sorted(cooling)) if cooling else ())
    cached = failover.cache.get(key)
    if cached is None:
        order = attempt_order(failover, picked, cooling)
        if len(failover.cache) > 256:  # cool-down states come and go
            failover.cache.clear()
        cached = failover.cache[key] = (order[0], [_header(k, v) for k, v in order_headers(order, failover.policy)])
    return cached


def order_headers(order: tuple[Target, ...], policy: RetryPolicy) -> tuple[tuple[str, str], ...]:
    """The headers a request with retries carries: its attempt order (cluster names, which
    Envoy's failover route reads per attempt) and the retry policy for Envoy's router."""
    clusters = [t.cluster for t in order]
    nexts = [(next_header(c), after) for c, after in zip(clusters, [*clusters[1:], NO_PROVIDER_CLUSTER])]
    return ((ORDER_HEADER, ",".join(clusters)), *nexts, *policy.envoy_headers())


_index_of: list = [None, None]  # the last table and its index


def _targets_by_rule(table: RoutingTable) -> dict[tuple[str, str], dict[str, Target]]:
    """(route, rule) -> cluster -> the target that rule gives that provider, for a table."""
    if _index_of[0] is table:
        return _index_of[1]
    index: dict[tuple[str, str], dict[str, Target]] = {}
    for route in table.routes.values():
        for rule in route.rules:
            if rule.failover is None:
                continue
            by_cluster = index.setdefault((route.name, rule.name), {})
            for order in rule.failover.orders:
                for target in order:
                    by_cluster.setdefault(target.cluster, target)
    _index_of[:] = [table, index]
    return index


def retry_target(table: RoutingTable, route: str, rule: str, order: str, attempt: int) -> Target:
    """The target of attempt `attempt` (2 or more) of a request of `route`/`rule`."""
    clusters = order.split(",") if order else []
    if not 2 <= attempt <= len(clusters):
        raise GatewayError(500, "the gateway could not prepare a retry", "retry_error")
    target = _targets_by_rule(table).get((route, rule), {}).get(clusters[attempt - 1])
    if target is None:  # the config changed under the request: its rule no longer names it
        raise GatewayError(503, "the provider of this retry is no longer configured", "retry_provider_gone",
                               "server_error")
    return target


class RetryRewriter:
    """The upstream ext_proc service for retried attempts: one `RetryExchange` per attempt."""

    def __init__(self, holder, body_limit: int):
        self._holder = holder
        self._body_limit = body_limit

    def exchange(self) -> "RetryExchange":
        return RetryExchange(self._holder.table)


class RetryExchange:
    __slots__ = ("_table", "_target", "_tried")

    def __init__(self, table: RoutingTable):
        self._table = table
        self._target: Target | None = None
        self._tried = ""

    def on_message(self, message: bytes) -> tuple[list[bytes], bool]:
        responses, done = self.on_request(pb.ProcessingRequest.FromString(message))
        return [r.SerializeToString() for r in responses], done

    def on_request(self, request: pb.ProcessingRequest) -> tuple[list[pb.ProcessingResponse], bool]:
        from .server import immediate  # the same JSON error answers as the request's own ext_proc

        phase = request.WhichOneof("request")
        try:
            if phase == "request_headers":
                return [self._on_headers(request)], False
            if phase == "request_body" and self._target is not None:
                return [self._on_body(request.request_body)], True
            raise GatewayError(500, "the gateway could not prepare a retry", "retry_error")
        except GatewayError as error:
            return [immediate(error)], True
        except Exception:  # never an attempt sent with the previous provider's key or model
            log.exception("retry rewrite failed on %s", phase)
            return [immediate(GatewayError(500, "the gateway could not prepare a retry", "retry_error"))], True

    def _on_headers(self, request: pb.ProcessingRequest) -> pb.ProcessingResponse:
        order, attempt = "", 0
        for h in request.request_headers.headers.headers:
            if h.key == ORDER_HEADER:
                order = h.raw_value.decode("latin-1")
            elif h.key == "x-envoy-attempt-count":
                attempt = int(h.raw_value or b"0")
        decision = request.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        fields = decision.fields if decision is not None else {}
        route = fields["route"].string_value if "route" in fields else ""
        rule = fields["rule"].string_value if "rule" in fields else ""
        target = self._target = retry_target(self._table, route, rule, order, attempt)
        by_cluster = _targets_by_rule(self._table).get((route, rule), {})
        self._tried = ",".join(by_cluster[c].provider_host if c in by_cluster else c
                               for c in order.split(",")[: attempt - 1])
        response = pb.ProcessingResponse()
        mutation = response.request_headers.response.header_mutation
        mutation.set_headers.extend([_header(":path", target.path), _header(":authority", target.provider_host)])
        if target.api_key:
            mutation.set_headers.append(_header("authorization", f"Bearer {target.api_key}"))
        else:
            mutation.remove_headers.append("authorization")
        return response

    def _on_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        target = self._target
        assert target is not None
        rewritten = rewrite_body(body.body, target)
        response = pb.ProcessingResponse()
        common = response.request_body.response
        common.header_mutation.set_headers.append(_header("content-length", str(len(rewritten.body))))
        common.body_mutation.body = rewritten.body
        response.dynamic_metadata.fields[METADATA_NAMESPACE].struct_value.update({
            "provider": target.provider, "provider_host": target.provider_host,
            "request_model": rewritten.model, "stream": rewritten.stream, "tried": self._tried,
        })
        return response
