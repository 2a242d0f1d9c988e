"""How many requests the gateway holds at once: the limits of Envoy's clusters (its circuit
breakers), per provider and for the control plane, and the file descriptors they take.

LLM traffic is long-lived: a streamed answer lasts seconds to minutes, so what a gateway must
hold is requests in flight, not requests per second. Envoy's default circuit breakers (1,024
connections, pending requests and requests per cluster) capped a provider at 1,024 streams in
flight and failed the rest with a 500. The limits here are sized for LLM traffic instead: on a
2-core machine one gateway held 10,000 concurrent streams (docs/scaling.md). Past a limit Envoy
refuses the request itself, answered as a JSON 503 `overloaded` with `Retry-After`
(`extproc.envoy.local_replies`); requests already in flight are not touched.

- A provider's limits come from its LLMProvider's `spec.connectionPool` (Istio's
  DestinationRule names), else `DEFAULT_PROVIDER_LIMITS`.
- The control plane's clusters (ext_proc, access log, xDS) take `--max-ext-proc-streams`. An
  ext_proc stream lives only until the gateway has answered the request's body (Envoy then
  closes it too), so that limit bounds requests being decided at once; a request whose answer
  the ext_proc also processes holds its stream until the answer ends, and then the limit bounds
  those answers in flight too: it defaults to the same 10,000.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_STREAMS = 10_000  # concurrent streams one gateway held on 2 cores (docs/scaling.md)
MAX_LIMIT = (1 << 32) - 1  # Envoy's thresholds are 32-bit
# Descriptors Envoy needs besides its streams' own: listeners, admin, the control plane's
# connections, DNS, files, and a margin for connections closing (TIME_WAIT does not hold one).
DESCRIPTOR_RESERVE = 1024
DESCRIPTORS_PER_STREAM = 2  # the client's connection and (HTTP/1.1) the provider's


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """One cluster's circuit breakers, in Istio's connectionPool terms: connections to the
    upstream (`tcp.maxConnections`; HTTP/1.1 needs one per request in flight), requests waiting
    for a connection (`http.http1MaxPendingRequests`), and requests in flight over any protocol
    (`http.http2MaxRequests`, which despite its name counts HTTP/1.1 requests too)."""

    max_connections: int = DEFAULT_MAX_STREAMS
    max_pending_requests: int = DEFAULT_MAX_STREAMS
    max_requests: int = DEFAULT_MAX_STREAMS

    @classmethod
    def streams(cls, count: int) -> ConnectionLimits:
        """Room for `count` requests in flight, each with its own connection if need be."""
        return cls(count, count, count)


DEFAULT_PROVIDER_LIMITS = ConnectionLimits()


def descriptors_needed(streams: int) -> int:
    """File descriptors a proxy needs to hold `streams` requests in flight."""
    return DESCRIPTORS_PER_STREAM * streams + DESCRIPTOR_RESERVE


def streams_within(descriptors: int) -> int:
    """How many requests in flight `descriptors` file descriptors hold (the inverse)."""
    return max(0, (descriptors - DESCRIPTOR_RESERVE) // DESCRIPTORS_PER_STREAM)


def connections_within(descriptors: int) -> int:
    """How many client connections a proxy may accept with `descriptors` file descriptors: one
    each, the reserve kept (a provider reached over HTTP/2 takes a few connections for thousands
    of requests; over HTTP/1.1 the provider's circuit breakers bound its connections)."""
    return max(1, descriptors - DESCRIPTOR_RESERVE)
