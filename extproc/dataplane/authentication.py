"""Who may talk to the control plane: every stream proves which Envoy it comes from.

Everything the ext_proc answers can carry a provider key, and the access-log service feeds the
usage metrics, so every gRPC stream to the control plane must come from an Envoy that proved
who it is. Two ways:

- Local mode: Envoy reaches the control plane over Unix sockets in a directory only the
  gateway's user can open. The file system is the check; the caller is `LOCAL` (sees all).
- TCP: each stream carries `authorization: Bearer <token>`. Either one static token from a file
  (compared in constant time; the caller is `LOCAL`, or what `--source-labels` states), or a
  Kubernetes ServiceAccount token checked with the TokenReview API for a dedicated audience; the
  caller is then the token's ServiceAccount, and sees only what its namespace may use
  (`extproc.policy.visibility`). A token the kubelet bound to a pod also names the pod: its
  labels and workload come from `extproc.dataplane.workload_identity`.

The TokenReview result is cached until shortly before the token expires (at most `max_ttl_s`),
so a stream costs a dict lookup (and one for the pod); the API server is asked once per token,
off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import enum
import hmac
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc

from ..policy.caller import LOCAL, Caller
from .workload_identity import DEFAULT_GRACE_S, PodDirectory, kubernetes_pods, pod_reference

log = logging.getLogger(__name__)

DEFAULT_AUDIENCE = "llm-gateway"
SERVICE_ACCOUNT_PREFIX = "system:serviceaccount:"


class Pending(enum.Enum):
    """`Authenticator.cached` cannot answer without asking someone: call `verify` first."""

    PENDING = "pending"


PENDING = Pending.PENDING


class Authenticator(Protocol):
    def cached(self, token: str | None) -> Caller | None | Pending:
        """The caller for this token now, without I/O: an identity, None (refused), or PENDING."""

    async def verify(self, token: str) -> tuple[str, Caller | None]:
        """Looks the token up (so that `cached` can answer it from now on); the token and its caller."""


def bearer(value: str | None) -> str | None:
    """The token of an `authorization: Bearer <token>` value (scheme case-insensitive)."""
    if not value:
        return None
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class StaticToken:
    """One shared token, read from a file once (for `serve` over TCP outside Kubernetes). The
    caller is `local`: the one the operator states (`--source-labels`), else `LOCAL`."""

    def __init__(self, token: str, local: Caller = LOCAL):
        if len(token) < 16:
            raise ValueError("the token is shorter than 16 characters")
        self._token = token.encode()
        self._local = local

    @classmethod
    def from_file(cls, path: str, local: Caller = LOCAL) -> StaticToken:
        return cls(Path(path).read_text().strip(), local)

    def cached(self, token: str | None) -> Caller | None:
        if token is None:
            return None
        return self._local if hmac.compare_digest(token.encode(), self._token) else None

    async def verify(self, token: str) -> tuple[str, Caller | None]:  # never PENDING
        return token, self.cached(token)


@dataclass(frozen=True)
class ReviewResult:
    """What the TokenReview API said about a token."""

    authenticated: bool
    username: str = ""
    audiences: tuple[str, ...] = ()
    error: str = ""
    extra: tuple[tuple[str, tuple[str, ...]], ...] = ()  # user.extra: the bound pod's name and UID


def identity_of(result: ReviewResult, audience: str) -> Caller | None:
    """The ServiceAccount a reviewed token proves, or None: not authenticated, not for our audience
    (a token meant for anything else, the API server's own included, is refused), or not a
    ServiceAccount's."""
    if not result.authenticated or audience not in result.audiences:
        return None
    if not result.username.startswith(SERVICE_ACCOUNT_PREFIX):
        return None
    namespace, _, name = result.username[len(SERVICE_ACCOUNT_PREFIX):].partition(":")
    if not namespace or not name:
        return None
    pod = pod_reference(dict(result.extra))
    return Caller(namespace, name, pod[0] if pod else None, uid=pod[1] if pod else None)


def bound_pod(result: ReviewResult) -> tuple[str, str] | None:
    """(name, UID) of the pod a reviewed token is bound to, if it is."""
    return pod_reference(dict(result.extra))


def token_expiry(token: str) -> float | None:
    """The `exp` claim of a JWT, read without checking the signature: only used to bound how long
    a result the API server gave is kept."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
        return float(exp) if isinstance(exp, (int, float)) else None
    except (IndexError, ValueError, TypeError, UnicodeDecodeError):
        return None


def cache_until(now: float, identity: Caller | None, expiry: float | None, max_ttl_s: float,
                negative_ttl_s: float, margin_s: float) -> float:
    """How long a review's answer is kept: a refusal briefly (so a flood of bad tokens does not
    become a flood of TokenReviews), an acceptance until `margin_s` before the token expires and
    at most `max_ttl_s` (so a deleted ServiceAccount stops working within that)."""
    if identity is None:
        return now + negative_ttl_s
    until = now + max_ttl_s
    if expiry is not None:
        until = min(until, expiry - margin_s)
    return until


def cache_key(token: str) -> str:
    """The cache key: the token itself. The HTTP/2 server hands over the same string object for
    every stream of a header block, whose hash Python keeps, so a hit is one dict lookup (a
    SHA-256 of a ~900-byte token per stream cost ten times more); the token is in this process's
    memory anyway, in the connection's header-block cache."""
    return token


class TokenReviewAuthenticator:
    """Kubernetes ServiceAccount tokens for `audience`, checked with the TokenReview API."""

    def __init__(self, review: Callable[[str, str], ReviewResult], audience: str = DEFAULT_AUDIENCE,
                 clock: Callable[[], float] = time.time, max_ttl_s: float = 300.0,
                 negative_ttl_s: float = 5.0, margin_s: float = 30.0, max_entries: int = 10000,
                 pods: PodDirectory | None = None):
        self._review = review
        self.pods = pods  # the pods tokens are bound to: their labels and workloads
        self.audience = audience
        self._clock = clock
        self._max_ttl_s = max_ttl_s
        self._negative_ttl_s = negative_ttl_s
        self._margin_s = margin_s
        self._max_entries = max_entries
        # token -> (the reviewed caller, until when, the pod it is bound to: (name, UID) or None)
        self._cache: dict[str, tuple[Caller | None, float, tuple[str, str] | None]] = {}
        self._in_flight: dict[str, asyncio.Future] = {}

    def cached(self, token: str | None) -> Caller | None | Pending:
        if token is None:
            return None
        entry = self._cache.get(cache_key(token))
        now = self._clock()
        if entry is None or entry[1] <= now:
            return PENDING
        reviewed, _, pod = entry
        if pod is None or reviewed is None:
            return reviewed
        return self._with_pod(reviewed, pod, now)

    def _with_pod(self, reviewed: Caller, pod: tuple[str, str], now: float) -> Caller | Pending:
        """The reviewed caller with its pod's labels and workload (PENDING: the pod not seen yet)."""
        if self.pods is None:  # no directory (a test): the pod is known, its labels are not
            return Caller(reviewed.namespace, reviewed.name, reviewed.pod, None, None, pod[1])
        assert reviewed.namespace is not None
        found = self.pods.caller(reviewed.namespace, reviewed.name, pod[0], pod[1], now)
        return PENDING if found is None else found

    async def verify(self, token: str) -> tuple[str, Caller | None]:
        key = cache_key(token)
        running = self._in_flight.get(key)
        if running is not None:  # the same token on many new streams: one review
            return token, await asyncio.shield(running)
        identity: Caller | None = None
        future = asyncio.get_running_loop().create_future()
        self._in_flight[key] = future
        try:
            entry = self._cache.get(key)
            if entry is not None and entry[1] > self._clock() and entry[0] is not None and entry[2] is not None:
                # reviewed already: only its pod is new here
                identity = await self._pod_caller(entry[0], entry[2])
                return token, identity
            try:
                result = await asyncio.to_thread(self._review, token, self.audience)
            except Exception as exc:  # the API server unreachable: refuse, briefly
                result = ReviewResult(False, error=f"TokenReview failed: {type(exc).__name__}")
            identity = identity_of(result, self.audience)
            pod = bound_pod(result) if identity is not None else None
            if identity is None:
                log.warning("refused a control-plane caller: %s", result.error or "token not valid for audience "
                            f"{self.audience!r}")
            now = self._clock()
            if len(self._cache) >= self._max_entries:
                self._cache = {k: v for k, v in self._cache.items() if v[1] > now}
                if len(self._cache) >= self._max_entries:
                    self._cache.clear()
            self._cache[key] = (identity, cache_until(now, identity, token_expiry(token), self._max_ttl_s,
                                                      self._negative_ttl_s, self._margin_s), pod)
            if identity is not None and pod is not None:
                identity = await self._pod_caller(identity, pod)
        finally:
            self._in_flight.pop(key, None)
            future.set_result(identity)
        return token, identity

    async def _pod_caller(self, reviewed: Caller, pod: tuple[str, str]) -> Caller:
        """The caller with its pod's labels, the pod read first where it was not seen yet."""
        found = self._with_pod(reviewed, pod, self._clock())
        if found is PENDING and self.pods is not None:
            assert reviewed.namespace is not None
            await asyncio.to_thread(self.pods.fetch, reviewed.namespace, pod[0], pod[1])
            found = self._with_pod(reviewed, pod, self._clock())
        if found is PENDING:  # cannot happen once fetched; never an identity it does not have
            return Caller(reviewed.namespace, reviewed.name, reviewed.pod, None, None, pod[1])
        assert isinstance(found, Caller)
        return found


@dataclass(frozen=True)
class AuthSetup:
    """How callers prove who they are over TCP, as a worker process is handed it (the
    authenticator itself cannot cross processes): a static token file (`kind` "static") standing
    for `local`, or ServiceAccount tokens for an audience ("review"), their pods' labels kept for
    `grace_s` once out of date (see `extproc.dataplane.workload_identity`)."""

    kind: str
    value: str  # the token file, or the audience
    local: Caller = LOCAL
    grace_s: float = DEFAULT_GRACE_S

    def build(self) -> Authenticator:
        if self.kind == "static":
            return StaticToken.from_file(self.value, self.local)
        api_client = kubernetes_client()
        pods = kubernetes_pods(api_client, self.grace_s)
        pods.start()
        return TokenReviewAuthenticator(kubernetes_review(api_client), self.value, pods=pods)


def authenticator_for(kind: str, value: str) -> Authenticator:
    """An authenticator from its description: ("static", token file) or ("review", audience)."""
    return AuthSetup(kind, value).build()


def kubernetes_client() -> object:
    """The official client's API client: in-cluster credentials, or KUBECONFIG."""
    from kubernetes import client, config

    try:
        config.load_incluster_config()
    except config.ConfigException:
        config.load_kube_config()
    return client.ApiClient()


def kubernetes_review(api_client=None) -> Callable[[str, str], ReviewResult]:
    """A TokenReview call with the official client (in-cluster credentials, or KUBECONFIG)."""
    from kubernetes import client

    if api_client is None:
        api_client = kubernetes_client()
    api = client.AuthenticationV1Api(api_client)

    def review(token: str, audience: str) -> ReviewResult:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        status = api.create_token_review(body, _request_timeout=10).status
        user = status.user
        extra = tuple((k, tuple(v or ())) for k, v in ((user.extra if user else None) or {}).items())
        return ReviewResult(authenticated=bool(status.authenticated), username=(user.username if user else "") or "",
                            audiences=tuple(status.audiences or ()), error=status.error or "", extra=extra)

    return review


async def metadata_caller(authenticator: Authenticator, metadata) -> Caller | None:
    """The verified caller of a grpcio stream, from its `authorization` metadata (None: refused).
    The xDS server's check (`GrpcAuthInterceptor`) and the workload certificates' issuer (SDS:
    who a certificate is for) both ask it, so both hold the same caller for a stream."""
    value = next((v for k, v in metadata or () if k == "authorization"), None)
    token = bearer(value if isinstance(value, str) else None)
    identity = authenticator.cached(token)
    if identity is PENDING and token is not None:
        _, identity = await authenticator.verify(token)
    return identity if isinstance(identity, Caller) else None


def speaks_for_operator(authenticator: Authenticator | None) -> bool:
    """Whether the Envoys an authenticator admits are the operator's own: local mode's socket (no
    authenticator) and the static token, which may use every object and get every key. A
    ServiceAccount's token speaks for that workload alone."""
    return authenticator is None or isinstance(authenticator, StaticToken)


class GrpcAuthInterceptor(grpc.aio.ServerInterceptor):
    """xDS over TCP: a stream without a valid bearer token ends with UNAUTHENTICATED before
    any resource is sent (and before it counts as an Envoy that must acknowledge)."""

    def __init__(self, authenticator: Authenticator):
        self._authenticator = authenticator

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a valid bearer token is required")

        self._deny = grpc.stream_stream_rpc_method_handler(deny)

    async def intercept_service(self, continuation, details):
        if await metadata_caller(self._authenticator, details.invocation_metadata) is None:
            return self._deny
        return await continuation(details)
