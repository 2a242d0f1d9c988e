"""Authentication and authorization decisions (extproc.auth), the namespace views the config
compiles, `${VAR}` under --key-env, and the HTTP/2 server refusing streams without a valid token."""

from __future__ import annotations

import asyncio
import time
import base64
import json
import os
import stat

import grpc
import pytest

from extproc.dataplane import grpc_h2 as h2
from extproc.dataplane.authentication import bearer, cache_until, identity_of, PENDING, ReviewResult, StaticToken, token_expiry, TokenReviewAuthenticator
from extproc.ops.socket_dir import private_dir
from extproc.policy.caller import Caller, LOCAL
from extproc.policy.visibility import may_use, visible_to
from extproc.config.compile import compile_config
from extproc.config.loader import key_env_allowed, parse_object
from support.manifests import provider, route, rule

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
    part = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()
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


HOME = "llm-gateway"


@pytest.mark.parametrize("namespace, export_to, visible", [
    ("team-a", None, frozenset({"team-a"})),
    (HOME, None, None),  # the control plane's namespace: everyone's
    ("team-a", ["."], frozenset({"team-a"})),
    ("team-a", [".", "team-b"], frozenset({"team-a", "team-b"})),
    ("team-a", ["team-b"], frozenset({"team-b"})),
    ("team-a", ["*"], None),
    (HOME, ["."], frozenset({HOME})),  # explicit exportTo narrows the default
    ("team-a", [], frozenset()),
])
def test_visible_to(namespace, export_to, visible):
    assert visible_to(namespace, export_to, HOME) == visible


@pytest.mark.parametrize("caller, visible, allowed", [
    (None, frozenset({"a"}), True), ("a", frozenset({"a"}), True), ("b", frozenset({"a"}), False),
    ("b", None, True), ("b", frozenset(), False),
])
def test_may_use(caller, visible, allowed):
    assert may_use(caller, visible) is allowed


def _compile(*docs, namespaces=True):
    loaded = [parse_object(d, "t.yaml", str(i))[0] for i, d in enumerate(docs)]
    return compile_config(loaded, namespaces=namespaces, home=HOME)


def test_compiled_routes_carry_their_namespace_views():
    c = _compile(provider("shared", "shared.example", namespace=HOME, api_key="k1"),
                 provider("a", "a.example", namespace="team-a", api_key="k2"),
                 provider("b", "b.example", namespace="team-b", api_key="k3", exportTo=["team-a"]),
                 route("ra", "chat-a", [rule("shared.example", "a.example", "b.example")], namespace="team-a"),
                 route("open", "chat-open", [rule("shared.example")], namespace="team-c", exportTo=["*"]))
    assert not [p for p in c.problems if p.severity == "error"], c.problems
    views = {host: c.table.routes[host].visible for host in
             ("shared.example", "a.example", "b.example", "chat-a.team-a", "chat-open")}
    assert views == {"shared.example": None, "a.example": frozenset({"team-a"}), "b.example": frozenset({"team-a"}),
                     "chat-a.team-a": frozenset({"team-a"}), "chat-open": None}


def test_a_route_may_not_use_a_provider_not_exported_to_its_namespace():
    c = _compile(provider("a", "a.example", namespace="team-a", api_key="k"),
                 route("steal", "chat", [rule("a.example")], namespace="team-b"))
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert problem.reason == "ProviderNotExported" and problem.obj == "LLMRoute team-b/steal"
    assert problem.field == "spec.rules[0].backendRefs[0].providerHost" and "team-a/a" in problem.message
    assert c.table.route_for("chat") is None
    # files (no namespaces): the operator wrote both, so it is allowed
    assert _compile(provider("a", "a.example", namespace="team-a", api_key="k"),
                    route("steal", "chat", [rule("a.example")], namespace="team-b"),
                    namespaces=False).table.route_for("chat").visible is None


def test_a_fallback_may_not_reach_a_provider_not_exported_to_the_routes_namespace():
    """A fallbackRef is a way to a provider's key like a backendRef: the same export check."""
    own = {**rule("own.example"), "fallbackRefs": [{"providerHost": "a.example"}], "retries": {"attempts": 1}}
    c = _compile(provider("a", "a.example", namespace="team-a", api_key="k"),
                 provider("own", "own.example", namespace="team-b", api_key="k2"),
                 route("steal", "chat", [own], namespace="team-b"))
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert problem.reason == "ProviderNotExported" and problem.field == "spec.rules[0].fallbackRefs[0].providerHost"
    assert c.table.route_for("chat") is None


@pytest.mark.parametrize("name, host, key_env, allowed", [
    ("K", "a.example", None, True),  # files: anything
    ("K", "a.example", {}, False),  # Kubernetes, nothing bound
    ("K", "a.example", {"K": "a.example"}, True),
    ("K", "evil.example", {"K": "a.example"}, False),
    ("OTHER", "a.example", {"K": "a.example"}, False),
    ("K", "A.Example", {"K": "a.example"}, True),
])
def test_key_env_allowed(name, host, key_env, allowed):
    assert key_env_allowed(name, host, key_env) is allowed


def test_unbound_key_variable_is_refused_with_its_reason():
    doc = provider("p", "evil.example", namespace="tenant", api_key="${YOUR_DASHSCOPE_API_KEY}")
    env = {"YOUR_DASHSCOPE_API_KEY": "sk-secret"}
    obj, problems = parse_object(doc, "k8s", "1", env, key_env={"YOUR_DASHSCOPE_API_KEY": "dashscope.aliyuncs.com"})
    assert obj is None
    (problem,) = problems
    assert problem.reason == "KeyEnvNotAllowed" and problem.field == "spec.configs.defaultConfig.openAIConfig.apiKey"
    assert "sk-secret" not in str(problem)
    ok, problems = parse_object(provider("p", "dashscope.aliyuncs.com", api_key="${YOUR_DASHSCOPE_API_KEY}"), "k8s", "1",
                                env, key_env={"YOUR_DASHSCOPE_API_KEY": "dashscope.aliyuncs.com"})
    assert not problems and ok.resource.spec.configs.default_config.openai_config.api_key == "sk-secret"


def test_private_dir(tmp_path):
    made = private_dir(str(tmp_path / "socks"))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert private_dir(made) == made  # ours and 0700: reused
    os.chmod(made, 0o750)
    with pytest.raises(PermissionError, match="must be 700"):
        private_dir(made)
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(str(tmp_path / "file"))
    os.symlink(tmp_path / "socks", tmp_path / "link")
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(str(tmp_path / "link"))


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


def test_a_namespace_that_may_not_use_a_route_gets_the_unknown_host_answer():
    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder

    table = _compile(provider("a", "a.example", namespace="team-a", api_key="sk-team-a"),
                     provider("shared", "shared.example", namespace=HOME, api_key="sk-shared")).table
    processor = ExternalProcessor(TableHolder(table))

    def ask(identity: Caller, host: str):
        headers = [base_pb2.HeaderValue(key=k, raw_value=v.encode())
                   for k, v in ((":authority", host), (":method", "POST"), (":path", "/"))]
        exchange = processor.exchange(identity)
        out, _ = exchange.on_request(pb.ProcessingRequest(
            request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=headers))))
        if not out:
            chat = b'{"messages": [{"role": "user", "content": "hi"}]}'
            out, _ = exchange.on_request(pb.ProcessingRequest(request_body=pb.HttpBody(body=chat, end_of_stream=True)))
        first = out[0]
        if first.HasField("immediate_response"):
            return first.immediate_response.status.code, first.immediate_response.body.replace(host.encode(), b"HOST")
        keys = [h.header.raw_value for h in first.request_headers.response.header_mutation.set_headers
                if h.header.key == "authorization"]
        return 200, keys

    unknown = ask(Caller("team-b", "envoy"), "nobody.example")
    assert unknown[0] == 404
    assert ask(Caller("team-b", "envoy"), "a.example") == unknown  # indistinguishable from an unknown host
    assert ask(Caller("team-a", "envoy"), "a.example") == (200, [b"Bearer sk-team-a"])
    assert ask(Caller("team-b", "envoy"), "shared.example") == (200, [b"Bearer sk-shared"])
    assert ask(LOCAL, "a.example") == (200, [b"Bearer sk-team-a"])


@pytest.mark.parametrize("socket_dir, token_sds, kind", [
    ("/run/gw", None, "pipe"), (None, "/etc/gw/token-sds.json", "token"), (None, None, "plain"),
])
def test_control_plane_clusters(socket_dir, token_sds, kind):
    from extproc.envoy.bootstrap import bootstrap, BootstrapOptions, TOKEN_SECRET

    boot = bootstrap(BootstrapOptions(socket_dir=socket_dir, token_sds=token_sds))
    clusters = boot["static_resources"]["clusters"][:2]
    for cluster, sock in zip(clusters, ("xds.sock", "ext_proc.sock")):
        address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        filters = [f["name"] for f in options.get("http_filters", [])]
        if kind == "pipe":
            assert address == {"pipe": {"path": f"/run/gw/{sock}"}} and not filters
        else:
            assert "socket_address" in address
            assert filters == (["envoy.filters.http.credential_injector", "envoy.filters.http.upstream_codec"]
                               if kind == "token" else [])
    if kind == "token":
        injector = options["http_filters"][0]["typed_config"]["credential"]["typed_config"]
        assert injector["credential"] == {"name": TOKEN_SECRET, "sds_config": {
            "path_config_source": {"path": token_sds}, "resource_api_version": "V3"}}
        assert injector["header"] == "authorization" and injector["header_value_prefix"] == "Bearer "


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
                             + h2.frame(h2.HEADERS, 0, 1, first[:7]) + h2.frame(h2.CONTINUATION, h2.END_HEADERS, 1, first[7:])
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
