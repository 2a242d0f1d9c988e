"""Mutual TLS between the sidecars and an egress gateway, Envoy's side: the TLS contexts that
name SDS secrets, the secrets themselves, and the Secret Discovery Service that hands each
Envoy its own.

- A sidecar's cluster for an egress gateway (`upstream_mtls`, sent over CDS) presents the pod's
  workload certificate (`WORKLOAD_SECRET`) and accepts only the gateway's identity, chained to
  the control plane's CA (`TRUST_BUNDLE_SECRET`).
- The gateway's listener (`downstream_mtls`, in its bootstrap) requires a client certificate
  chained to that CA and naming one of the mesh's SPIFFE IDs, and presents its own.
- Both get their secrets from the control plane of the sidecars over SDS (`SecretDiscovery`,
  on the xDS server, behind the same check as CDS and RDS): who asks is the verified caller of
  the stream, and a certificate is issued for the identity that caller may have
  (`extproc.ops.workload_ca`). A certificate is pushed again on the same stream before it is
  due for renewal; Envoy swaps it in for new connections, and the ones open go on.

Private keys travel only on that authenticated stream (as provider keys travel on the
ext_proc's), and Envoy's config dump shows them redacted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from envoy.extensions.transport_sockets.tls.v3 import secret_pb2
from envoy.service.discovery.v3 import discovery_pb2
from envoy.service.secret.v3 import sds_pb2_grpc
from google.protobuf import any_pb2

from ..policy.caller import Caller
from ..policy.peer_identity import SPIFFE_PREFIX
from ..protocol import TRUST_BUNDLE_SECRET, WORKLOAD_SECRET

log = logging.getLogger(__name__)

SECRET_TYPE_URL = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
TLS = "envoy.transport_sockets.tls"
# Our own hop at both ends: TLS 1.3 only (one round trip to a new connection's first request)
TLS_PARAMS = {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3"}

# (the stream's verified caller, whether it speaks for the operator), or None: refused
Identify = Callable[[Any], Awaitable[tuple[Caller, bool] | None]]
# (secret name, caller, operator) -> (the secret, when to send it again), or None: not for this caller
SecretFor = Callable[[str, Caller, bool], tuple[secret_pb2.Secret, float] | None]


def sds_config(cluster: str, initial_fetch_timeout_s: float | None = None) -> dict:
    """Where Envoy asks for a secret: the control plane's xDS server on `cluster` (gRPC, with the
    credentials that cluster carries). `initial_fetch_timeout_s` 0: wait for it however long."""
    config: dict = {"resource_api_version": "V3", "api_config_source": {
        "api_type": "GRPC", "transport_api_version": "V3", "set_node_on_first_message_only": True,
        "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}]}}
    if initial_fetch_timeout_s is not None:
        config["initial_fetch_timeout"] = f"{initial_fetch_timeout_s:g}s"
    return config


def _common(own: str, peer_san: dict, cluster: str, initial_fetch_timeout_s: float | None) -> dict:
    source = sds_config(cluster, initial_fetch_timeout_s)
    return {
        "tls_params": TLS_PARAMS,
        "alpn_protocols": ["h2", "http/1.1"],
        "tls_certificate_sds_secret_configs": [{"name": own, "sds_config": source}],
        "combined_validation_context": {
            "default_validation_context": {"match_typed_subject_alt_names": [{"san_type": "URI", "matcher": peer_san}]},
            "validation_context_sds_secret_config": {"name": TRUST_BUNDLE_SECRET, "sds_config": source}},
    }


def upstream_mtls(gateway_id: str, cluster: str) -> dict:
    """A sidecar's transport socket to an egress gateway: its workload certificate, and only the
    gateway's SPIFFE ID accepted at the other end."""
    return {"name": TLS, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "common_tls_context": _common(WORKLOAD_SECRET, {"exact": gateway_id}, cluster, None)}}


def downstream_mtls(own_id: str, cluster: str) -> dict:
    """An egress gateway's listener: a client certificate of the mesh required (chained to the
    CA, a SPIFFE ID of its trust domain), its own certificate `own_id` presented. Its secrets are
    waited for however long: the listener never takes a connection without them."""
    return {"name": TLS, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _common(own_id, {"prefix": SPIFFE_PREFIX}, cluster, 0)}}


def certificate_secret(name: str, cert_pem: bytes, key_pem: bytes) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=name)
    secret.tls_certificate.certificate_chain.inline_bytes = cert_pem
    secret.tls_certificate.private_key.inline_bytes = key_pem
    return secret


def trust_bundle_secret(ca_pem: bytes) -> secret_pb2.Secret:
    secret = secret_pb2.Secret(name=TRUST_BUNDLE_SECRET)
    secret.validation_context.trusted_ca.inline_bytes = ca_pem
    return secret


_RENEW = object()  # a stream's wake-up: a certificate it holds is due for renewal


class SecretDiscovery(sds_pb2_grpc.SecretDiscoveryServiceServicer):
    """SDS, state of the world: each stream gets the secrets it names, for its verified caller,
    and again whenever one of them is due for renewal (the caller checked again first: one whose
    credentials no longer hold gets UNAUTHENTICATED, and its Envoy reconnects with new ones)."""

    def __init__(self, identify: Identify, secret_for: SecretFor, clock: Callable[[], float] = time.time):
        self._identify = identify
        self._secret_for = secret_for
        self._clock = clock

    async def StreamSecrets(self, request_iterator, context) -> None:
        who = await self._identify(context)
        if who is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")
            return
        requests: asyncio.Queue = asyncio.Queue()

        async def read() -> None:
            try:
                async for request in request_iterator:
                    await requests.put(request)
            finally:
                await requests.put(None)

        reader = asyncio.ensure_future(read())
        names: tuple[str, ...] | None = None
        version, due = 0, math.inf
        refused: set[str] = set()
        try:
            while True:
                wait = None if due == math.inf else max(0.0, due - self._clock())
                try:
                    request = await asyncio.wait_for(requests.get(), wait)
                except TimeoutError:
                    if self._clock() < due:  # woken a little early: not due yet
                        continue
                    request = _RENEW
                if request is None:
                    return
                if request is _RENEW:
                    who = await self._identify(context)
                    if who is None:
                        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "the caller's credentials no longer hold")
                        return
                else:
                    if request.HasField("error_detail"):
                        log.error("envoy %s rejected secrets version %s: %s", request.node.id or "?",
                                  request.response_nonce, request.error_detail.message)
                    asked = tuple(request.resource_names)
                    if asked == names and request.response_nonce:
                        continue  # Envoy's answer to what it was sent
                    names = asked
                resources, due = [], math.inf
                for name in names or ():
                    got = self._secret_for(name, *who)
                    if got is None:
                        if name not in refused:
                            refused.add(name)
                            log.warning("refused secret %r to %s/%s: not an identity its credentials prove", name,
                                        who[0].namespace or "-", who[0].name)
                        continue
                    packed = any_pb2.Any()
                    packed.Pack(got[0])
                    resources.append(packed)
                    due = min(due, got[1])
                version += 1
                await context.write(discovery_pb2.DiscoveryResponse(
                    version_info=str(version), nonce=str(version), type_url=SECRET_TYPE_URL, resources=resources))
        finally:
            reader.cancel()
