"""Property-based fuzzing of the parsers a client or a config can reach: whatever comes in, the
answer is a result or a clear error, never a crash. Bounded in CI (a few seconds); for a long run:
LLM_GATEWAY_FUZZ_EXAMPLES=50000 scripts/test tests/unit/test_fuzz.py"""

from __future__ import annotations

import json
import logging
import os
import struct

import hpack
import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extproc.dataplane import grpc_h2 as h2
from extproc.config.loader import parse_object
from extproc.errors import GatewayError
from extproc.policy import openai_api as endpoints
from extproc.dataplane.body_rewrite import rewrite_body
from extproc.policy.table import Target

EXAMPLES = int(os.environ.get("LLM_GATEWAY_FUZZ_EXAMPLES", "300"))
fuzz = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TARGETS = [
    Target("r", "rule", "p", "h", "c", "/v1/chat/completions", "m", None, "k"),
    Target("r", "rule", "p", "h", "c", "/v1/chat/completions", None, True, "k"),
    Target("r", "rule", "p", "h", "c", "/v1/chat/completions", "m", False, None),
]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=30)


def _check_rewrite(body: bytes, target: Target) -> None:
    try:
        out = rewrite_body(body, target)
    except GatewayError as exc:
        assert 400 <= exc.status < 500 and json.loads(exc.body())["error"]["code"]
        return
    data = orjson.loads(out.body)
    assert isinstance(data, dict) and isinstance(data["messages"], list) and data["messages"]
    if target.model is not None:
        assert data["model"] == target.model
    if target.stream is not None:
        assert data["stream"] is target.stream


@fuzz
@given(st.binary(max_size=512), st.sampled_from(TARGETS))
def test_any_bytes_get_a_rewrite_or_a_4xx(body, target):
    _check_rewrite(body, target)


@fuzz
@given(json_values, st.sampled_from(TARGETS))
def test_any_json_gets_a_rewrite_or_a_4xx(value, target):
    _check_rewrite(json.dumps(value).encode(), target)


@fuzz
@given(st.dictionaries(st.sampled_from(["messages", "model", "stream", "stream_options", "temperature"]), json_values),
       st.sampled_from(TARGETS))
def test_chat_shaped_json_gets_a_rewrite_or_a_4xx(value, target):
    _check_rewrite(json.dumps(value).encode(), target)


@fuzz
@given(st.dictionaries(st.sampled_from(["input", "prompt", "model", "stream", "stream_options", "encoding_format"]),
                       json_values),
       st.sampled_from([endpoints.EMBEDDINGS, endpoints.COMPLETIONS]),
       st.sampled_from([*TARGETS, Target("r", "rule", "p", "h", "c", "/v1/chat/completions", "m", True, "k",
                                         base_path="/v1", embedding_model="e")]))
def test_embeddings_and_completions_get_a_rewrite_or_a_4xx(value, endpoint, target):
    """Other endpoints: their own field required, the model configured for them or the client's."""
    try:
        out = rewrite_body(json.dumps(value).encode(), target, endpoint)
    except GatewayError as exc:
        assert 400 <= exc.status < 500 and json.loads(exc.body())["error"]["code"]
        return
    data = orjson.loads(out.body)
    assert data[endpoint.required] == value[endpoint.required]
    expected_model = target.embedding_model if endpoint is endpoints.EMBEDDINGS and target.embedding_model else value["model"]
    assert data["model"] == out.model == expected_model
    assert data.get("stream") == value.get("stream")  # the config's stream is chat's only
    assert out.stream == (endpoint is endpoints.COMPLETIONS and value.get("stream") is True)


@fuzz
@given(st.dictionaries(st.sampled_from(["apiVersion", "kind", "metadata", "spec"]), json_values),
       st.sampled_from(["LLMProvider", "LLMRoute", "Service", None]))
def test_config_documents_parse_or_say_why(doc, kind):
    if kind is not None:
        doc = {**doc, "kind": kind, "apiVersion": "istio.alibabacloud.com/v1beta1"}
    obj, problems = parse_object(doc, "fuzz.yaml", "1", {})
    assert obj is not None or problems or kind in (None, "Service") or doc.get("kind") not in ("LLMProvider", "LLMRoute")
    for problem in problems:
        assert problem.file == "fuzz.yaml" and problem.message


# The lean HTTP/2 server: whatever Envoy (or anything else reaching its port) sends, it answers
# with well-formed frames or closes the connection with GOAWAY; it never raises.

class _Failures(logging.Handler):
    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("HTTP/2 connection failed"):
            self.seen.append(record.exc_text or record.getMessage())


class _Transport:
    def __init__(self):
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.out += data

    def close(self) -> None:
        self.closed = True


class _Echo:
    def on_message(self, message: bytes):
        if message.startswith(b"!"):
            raise RuntimeError("a bug in a handler")
        return [message, message] if message.startswith(b"2") else message, message.startswith(b"end")


_HEADER_BLOCK = hpack.Encoder().encode([(":method", "POST"), (":scheme", "http"), (":path", "/t/M"),
                                        (":authority", "x"), ("content-type", "application/grpc")])
_frames = st.builds(
    lambda ftype, flags, sid, payload: h2.frame(ftype, flags, sid, payload),
    st.integers(0, 10), st.integers(0, 255), st.sampled_from([0, 1, 2, 3, 5, 7, 2**31 - 1]),
    st.one_of(st.binary(max_size=40), st.just(_HEADER_BLOCK),
              st.binary(max_size=30).map(lambda m: struct.pack(">BI", 0, len(m)) + m),
              st.just(struct.pack(">BI", 0, 10**6)), st.just(b"\0\0\0\0")),
)


def _well_formed(data: bytes) -> None:
    """Every byte the server wrote belongs to a complete frame of a known type."""
    pos = 0
    while pos < len(data):
        assert len(data) - pos >= 9
        length = int.from_bytes(data[pos:pos + 3], "big")
        assert data[pos + 3] <= h2.CONTINUATION
        pos += 9 + length
    assert pos == len(data)


@fuzz
@given(st.lists(_frames, max_size=25), st.lists(st.integers(1, 200), max_size=10), st.booleans())
def test_h2_server_never_raises(frames, cuts, with_preface):
    wire = (h2.PREFACE if with_preface else b"") + b"".join(frames)
    transport = _Transport()
    connection = h2.H2Connection({"/t/M": lambda identity: _Echo()}, max_message=1000)
    connection.connection_made(transport)
    failures = _Failures()
    logging.getLogger("extproc.h2").addHandler(failures)
    try:
        pos = 0
        for cut in [*cuts, len(wire)]:
            if pos >= len(wire):
                break
            connection.data_received(wire[pos:pos + cut])  # also after a close, as asyncio may
            pos += cut
    finally:
        logging.getLogger("extproc.h2").removeHandler(failures)
    assert failures.seen == [], "the connection's last-resort catch was reached: a bug"
    _well_formed(bytes(transport.out))
    if not with_preface and wire and not wire.startswith(h2.PREFACE[:len(wire)]):
        assert transport.closed
