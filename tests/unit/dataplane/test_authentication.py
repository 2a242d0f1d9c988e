"""Authentication (extproc.dataplane.authentication): bearer tokens, TokenReview's answers and
their cache, a static token, and the HTTP/2 server refusing streams without a valid token.
(Authorization, what a caller may use: policy/test_visibility.py, config/test_compile.py.)"""

from __future__ import annotations

import asyncio
import base64
import json
import time

import grpc
import pytest

from extproc.dataplane import grpc_h2 as h2
from extproc.dataplane.authentication import (
    PENDING,
    ReviewResult,
    StaticToken,
    TokenReviewAuthenticator,
    bearer,
    cache_until,
    identity_of,
    metadata_caller,
    speaks_for_operator,
    token_expiry,
)
from extproc.policy.caller import LOCAL, Caller

AUD = "llm-gateway"


@pytest.mark.parametrize("value, token", [
    ("Bearer abc", "abc"), ("bearer abc", "abc"), ("BEARER  abc ", "abc"), ("Basic abc", None), ("Bearer ", None),
    ("abc", None), ("", None), (None, None),
])
def test_bearer(value, token):
    assert bearer(value) == token


@pytest.mark.parametrize("result, identity", [
    (ReviewResult(True, "system:serviceaccount:team-a:sleep", (AUD,)), Caller("team-a", "sleep")),
    (ReviewResult(True, "system:serviceaccount:team-a:sleep", ("https://kubernetes.default.svc",)), None),
    (ReviewResult(True, "system:serviceaccount:team-a:sleep", ()), None),  # no audience said: not ours
    (ReviewResult(False, "", (AUD,), "token has expired"), None),
    (ReviewResult(True, "alice", (AUD,)), None),  # a user, not a ServiceAccount
    (ReviewResult(True, "system:serviceaccount:team-a", (AUD,)), None),
    (ReviewResult(True, "system:serviceaccount::sleep", (AUD,)), None),
])
def test_identity_of_a_review(result, identity):
    assert identity_of(result, AUD) == identity


def _jwt(claims: dict) -> str:
    def part(d):
        return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'RS256'})}.{part(claims)}.sig"


@pytest.mark.parametrize("token, expiry", [
    (_jwt({"exp": 2000}), 2000.0), (_jwt({"sub": "x"}), None), ("not-a-jwt", None), ("a.!!!.c", None),
    (_jwt({"exp": "soon"}), None),
])
def test_token_expiry(token, expiry):
    assert token_expiry(token) == expiry


@pytest.mark.parametrize("identity, expiry, until", [
    (Caller("a", "b"), None, 1300.0),  # at most max_ttl
    (Caller("a", "b"), 1100.0, 1070.0),  # margin before expiry
    (Caller("a", "b"), 5000.0, 1300.0),
    (None, 5000.0, 1005.0),  # refusals briefly
])
def test_cache_until(identity, expiry, until):
    assert cache_until(1000.0, identity, expiry, max_ttl_s=300, negative_ttl_s=5, margin_s=30) == until


def test_static_token_is_compared_whole_and_sees_everything():
    auth = StaticToken("s3cret-token-of-32-characters-xx")
    assert auth.cached("s3cret-token-of-32-characters-xx") is LOCAL
    for wrong in ("s3cret-token-of-32-characters-x", "s3cret-token-of-32-characters-xxx", "", None):
        assert auth.cached(wrong) is None
    with pytest.raises(ValueError):
        StaticToken("short")


def test_token_review_is_asked_once_per_token_until_shortly_before_expiry():
    now = [1000.0]
    asked: list[tuple[str, str]] = []
    good, bad = _jwt({"exp": 1200}), _jwt({"exp": 1200, "x": 1})

    def review(token: str, audience: str) -> ReviewResult:
        asked.append((token, audience))
        if token == good:
            return ReviewResult(True, "system:serviceaccount:team-a:sleep", (audience,))
        return ReviewResult(False, error="invalid")

    auth = TokenReviewAuthenticator(review, AUD, clock=lambda: now[0])

    async def main():
        assert auth.cached(good) is PENDING and auth.cached(None) is None
        results = await asyncio.gather(*(auth.verify(good) for _ in range(5)))  # concurrent: one review
        assert all(r == (good, Caller("team-a", "sleep")) for r in results)
        assert await auth.verify(bad) == (bad, None)

    asyncio.run(main())
    assert asked == [(good, AUD), (bad, AUD)]
    assert auth.cached(good) == Caller("team-a", "sleep") and auth.cached(bad) is None
    now[0] = 1169.0
    assert auth.cached(good) == Caller("team-a", "sleep")
    now[0] = 1171.0  # within 30 s of expiry: asked again
    assert auth.cached(good) is PENDING and auth.cached(bad) is PENDING


def test_token_review_failure_refuses():
    def review(token, audience):
        raise ConnectionError("API server down")

    auth = TokenReviewAuthenticator(review, AUD)
    assert asyncio.run(auth.verify("t")) == ("t", None)
    assert auth.cached("t") is None


# the HTTP/2 server: streams are opened only for a verified caller, who reaches the call's factory

METHOD = "/test.Who/Ask"


class Who:
    def __init__(self, identity: Caller):
        self.identity = identity

    def on_message(self, message: bytes):
        return None, False

    def on_client_end(self) -> bytes:
        return f"{self.identity.namespace}/{self.identity.name}".encode()


def test_h2_server_opens_streams_only_for_verified_callers():
    reviews: list[str] = []

    def review(token, audience):
        reviews.append(token)
        if token == "good":
            return ReviewResult(True, "system:serviceaccount:team-a:envoy", (audience,))
        return ReviewResult(False)

    auth = TokenReviewAuthenticator(review, AUD)

    async def main():
        server = await h2.serve("127.0.0.1", 0, {METHOD: Who}, 1 << 20, auth)
        port = server.sockets[0].getsockname()[1]
        out = []
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = channel.stream_stream(METHOD, request_serializer=lambda b: b, response_deserializer=lambda b: b)
                for token in (None, "bad", "good", "good", "bad"):
                    metadata = (("authorization", f"Bearer {token}"),) if token else None
                    stream = call(iter([]), metadata=metadata)  # no message: nothing races the refusal
                    try:
                        out.append([m async for m in stream])
                    except grpc.aio.AioRpcError as error:
                        out.append(error.code())
        finally:
            server.close()
        return out

    assert asyncio.run(main()) == [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAUTHENTICATED,
                                   [b"team-a/envoy"], [b"team-a/envoy"], grpc.StatusCode.UNAUTHENTICATED]
    assert reviews == ["bad", "good"]  # each token reviewed once; later streams are cache hits


def test_h2_server_holds_frames_back_while_a_token_is_verified():
    """A new token arrives in a header block split by CONTINUATION, with its messages and a second
    stream in the same write: all wait for the review, then run in order, each stream once."""
    import socket
    import struct

    import hpack

    reviews: list[str] = []

    def review(token, audience):
        reviews.append(token)
        time.sleep(0.2)  # a slow API server: the frames after the header block arrive meanwhile
        return ReviewResult(True, "system:serviceaccount:team-a:envoy", (audience,))

    def block() -> bytes:
        return hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", METHOD), (":authority", "x"),
                                       ("content-type", "application/grpc"), ("authorization", "Bearer slow-token")])

    def message(data: bytes) -> bytes:
        return struct.pack(">BI", 0, len(data)) + data

    async def main():
        server = await h2.serve("127.0.0.1", 0, {METHOD: Who}, 1 << 20, TokenReviewAuthenticator(review, AUD))
        port = server.sockets[0].getsockname()[1]

        def blocking():
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                first, second = block(), block()
                sock.sendall(h2.PREFACE + h2.frame(h2.SETTINGS, 0, 0)
                             + h2.frame(h2.HEADERS, 0, 1, first[:7])
                             + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, first[7:])
                             + h2.frame(h2.DATA, h2.END_STREAM, 1, message(b"x"))
                             + h2.frame(h2.HEADERS, h2.END_HEADERS | h2.END_STREAM, 3, second))
                buf, frames = b"", []
                while sum(1 for f in frames if f[0] == h2.HEADERS and f[1] & h2.END_STREAM) < 2:
                    chunk = sock.recv(65536)
                    assert chunk, "connection closed"
                    buf += chunk
                    while len(buf) >= 9 and len(buf) >= 9 + int.from_bytes(buf[:3], "big"):
                        length = int.from_bytes(buf[:3], "big")
                        frames.append((buf[3], buf[4], int.from_bytes(buf[5:9], "big"), buf[9:9 + length]))
                        buf = buf[9 + length:]
                return frames
        try:
            return await asyncio.to_thread(blocking)
        finally:
            server.close()

    frames = asyncio.run(main())
    for sid in (1, 3):
        data = b"".join(f[3] for f in frames if f[0] == h2.DATA and f[2] == sid)
        assert data == struct.pack(">BI", 0, 12) + b"team-a/envoy", (sid, frames)
    assert reviews == ["slow-token"]


def test_a_grpcio_streams_caller_from_its_metadata():
    """The xDS server's check and the workload certificates' issuer (SDS) read the same caller."""
    good = _jwt({"exp": 4_000_000_000})
    review = TokenReviewAuthenticator(
        lambda token, audience: ReviewResult(True, "system:serviceaccount:shop:payments", (audience,), extra=(
            ("authentication.kubernetes.io/pod-name", ("payments-1",)),
            ("authentication.kubernetes.io/pod-uid", ("0b6c-11aa",)))) if token == good
        else ReviewResult(False), AUD)
    static = StaticToken("s" * 20)

    async def main():
        found = await metadata_caller(review, (("authorization", f"Bearer {good}"),))
        assert (found.namespace, found.name, found.pod, found.uid) == ("shop", "payments", "payments-1", "0b6c-11aa")
        assert await metadata_caller(review, (("authorization", "Bearer nope"),)) is None
        assert await metadata_caller(review, ()) is None
        assert await metadata_caller(static, (("authorization", "Bearer " + "s" * 20),)) is LOCAL

    asyncio.run(main())
    # the operator's own Envoys (a Unix socket, the static token) may be issued any identity; a ServiceAccount's its own
    assert speaks_for_operator(None) and speaks_for_operator(static) and not speaks_for_operator(review)
