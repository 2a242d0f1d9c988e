"""Admission by memory (a cap on body bytes held at once), stream accounting for the drain, and
the health answers a draining server gives."""

from __future__ import annotations

import pytest

from extproc.policy.body_memory import Inflight, TRIM_AFTER_BYTES
from extproc.dataplane.health_check import HealthCheck
from extproc.ops.drain import drain_plan
from extproc.envoy.addresses import HostPort
from extproc.dataplane.processor import ExternalProcessor
from extproc.policy.table import TableHolder
from support.ext_proc_messages import body_msg, error_of, headers_msg
from support.manifests import DASHSCOPE


@pytest.fixture(scope="module")
def seed_table():
    from support.manifests import load_seed

    return load_seed("01-LLMProvider.yaml").table


@pytest.mark.parametrize(("cap", "takes", "held", "refused"), [
    pytest.param(100, [60, 40], 100, 0, id="up-to-the-cap"),
    pytest.param(100, [60, 41], 60, 1, id="one-byte-over-is-refused"),
    pytest.param(100, [101, 10], 10, 1, id="a-big-one-refused-a-small-one-after-it-admitted"),
    pytest.param(100, [0, 0], 0, 0, id="nothing-held"),
])
def test_take_admits_up_to_the_cap(cap, takes, held, refused):
    inflight = Inflight(cap)
    for size in takes:
        inflight.take(size)
    assert (inflight.held, inflight.refused) == (held, refused)


@pytest.mark.parametrize(("burst", "trims"), [
    pytest.param([TRIM_AFTER_BYTES + 1], 1, id="a-big-burst-is-given-back"),
    pytest.param([TRIM_AFTER_BYTES // 2, TRIM_AFTER_BYTES // 2 + 1], 1, id="many-bodies-make-a-big-burst"),
    pytest.param([TRIM_AFTER_BYTES], 0, id="a-small-burst-stays-warm"),
])
def test_free_heap_is_given_back_once_a_big_burst_is_over(burst, trims):
    calls = []
    inflight = Inflight(1 << 40, trim=lambda: calls.append(1))
    for size in burst:
        assert inflight.take(size)
    for size in burst[:-1]:
        inflight.give_back(size)
        assert calls == []  # not while bytes are still held
    inflight.give_back(burst[-1])
    assert len(calls) == trims


def body_of_size(size: int) -> bytes:
    body = b'{"messages": [{"role": "user", "content": ""}]}'
    return body[:-3] + b" " * (size - len(body)) + body[-3:]


def test_a_body_that_would_pass_the_cap_gets_503_before_its_bytes_and_smaller_ones_flow(seed_table):
    proc = ExternalProcessor(TableHolder(seed_table), draw=lambda: 0.0, body_limit=1000, inflight=Inflight(1000))
    big = proc.exchange()
    assert big.on_request(headers_msg(DASHSCOPE, extra={"content-length": "700"})) == ([], False)
    assert proc.inflight.held == 700

    refused = proc.exchange()
    answers, done = refused.on_request(headers_msg(DASHSCOPE, extra={"content-length": "400"}))
    assert done  # answered at the headers: its body is never held
    status, error, headers, details = error_of(answers[0])
    assert (status, error["error"]["code"], error["error"]["type"]) == (503, "overloaded", "server_error")
    assert headers["retry-after"] == "1" and headers["content-type"] == "application/json"
    assert details == "llm_gateway_overloaded"
    refused.on_close()

    small = proc.exchange()
    assert small.on_request(headers_msg(DASHSCOPE, extra={"content-length": "300"})) == ([], False)
    answers, done = small.on_request(body_msg(body_of_size(300)))
    assert done and answers[0].WhichOneof("response") == "request_headers"
    small.on_close()

    assert (proc.inflight.held, proc.inflight.refused, proc.inflight.streams) == (700, 1, 1)
    big.on_close()
    big.on_close()  # once only, however many times the server says so
    assert (proc.inflight.held, proc.inflight.streams) == (0, 0)


def test_a_body_without_length_is_counted_as_it_arrives(seed_table):
    proc = ExternalProcessor(TableHolder(seed_table), draw=lambda: 0.0, body_limit=1000, inflight=Inflight(1000))
    holder = proc.exchange()
    holder.on_request(headers_msg(DASHSCOPE))
    holder.on_request(body_msg(b" " * 600, end_of_stream=False))
    assert proc.inflight.held == 600
    chunked = proc.exchange()
    chunked.on_request(headers_msg(DASHSCOPE))
    assert chunked.on_request(body_msg(b" " * 300, end_of_stream=False)) == ([], False)
    answers, done = chunked.on_request(body_msg(b" " * 200, end_of_stream=False))
    assert done and error_of(answers[0])[0] == 503
    chunked.on_close()
    holder.on_close()
    assert proc.inflight.held == 0


@pytest.mark.parametrize(("serving", "answer"), [(True, b"\x08\x01"), (False, b"\x08\x02")])
def test_health_check_says_not_serving_while_draining(serving, answer):
    assert HealthCheck(lambda: serving).on_message(b"") == (answer, True)


@pytest.mark.parametrize(("grace", "notice", "expected"), [
    pytest.param(25.0, 3.0, (3.0, 22.0), id="default"),
    pytest.param(2.0, 3.0, (1.0, 1.0), id="a-short-grace-halves"),
])
def test_drain_plan(grace, notice, expected):
    assert drain_plan(grace, notice) == expected


def test_ext_proc_cluster_is_health_checked_and_a_dead_replica_ejected():
    from envoy.config.bootstrap.v3 import bootstrap_pb2
    import support.envoy_api  # noqa: F401  (registers every @type the bootstrap uses)
    from google.protobuf import json_format

    from extproc.envoy.bootstrap import bootstrap, BootstrapOptions
    from extproc.protocol import CONTROL_CLUSTER, EXT_PROC_CLUSTER

    from envoy.config.cluster.v3 import cluster_pb2

    boot = bootstrap(BootstrapOptions(control=HostPort("llm-gateway-control.llm-gateway.svc", 18000), sidecar=True))
    # valid Envoy API (the clusters: the whole bootstrap names filters newer than xds-protos)
    clusters = {c["name"]: json_format.ParseDict(c, cluster_pb2.Cluster()) for c in boot["static_resources"]["clusters"]}
    ext_proc = clusters[EXT_PROC_CLUSTER]
    (check,) = ext_proc.health_checks
    assert check.HasField("grpc_health_check") and check.unhealthy_threshold.value == 1
    assert ext_proc.outlier_detection.consecutive_local_origin_failure.value == 1
    assert not clusters[CONTROL_CLUSTER].health_checks  # grpcio's xDS: Envoy reconnects elsewhere by itself
    listeners = {l["name"]: l for l in boot["static_resources"]["listeners"]}
    assert listeners["llm_gateway_readiness"]["address"]["socket_address"]["port_value"] == 15021

