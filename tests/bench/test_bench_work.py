"""The bench's account of the floor's margin (issue 12), and its in-process measure of the
ext_proc's own work: that it measures the real path (answers routed, entries recorded with usage)."""

from __future__ import annotations

import pytest

from benchmarks import work


@pytest.mark.parametrize(("floor", "gateway", "own_work", "expected"), [
    # a run of the bench: Envoy's extra alone takes all 0.9 of the floor allows
    ((235.1, 37.7), (312.3, 88.9), 24.7, {
        "envoy_extra_us": 26.0, "ext_proc_extra_us": 51.2, "allowed_extra_us": 26.12, "left_for_ext_proc_us": 0.12,
        "best_with_free_processor": 0.9004, "best_with_own_work_only": 0.8219}),
    # a gateway that cost what the floor does
    ((200.0, 40.0), (200.0, 40.0), 0.0, {
        "envoy_extra_us": 0.0, "ext_proc_extra_us": 0.0, "allowed_extra_us": 22.22, "left_for_ext_proc_us": 22.22,
        "best_with_free_processor": 1.0, "best_with_own_work_only": 1.0}),
    # Envoy no busier for the gateway than for the floor (the difference is noise): counted as none
    ((200.0, 40.0), (230.0, 80.0), 20.0, {
        "envoy_extra_us": 0.0, "ext_proc_extra_us": 40.0, "allowed_extra_us": 22.22, "left_for_ext_proc_us": 22.22,
        "best_with_free_processor": 1.0, "best_with_own_work_only": 0.9091}),
])
def test_floor_margin(floor, gateway, own_work, expected):
    got = work.floor_margin(*floor, *gateway, own_work_us=own_work)
    assert got == pytest.approx(expected, abs=0.005)


def _answers():
    exchange = work.seed_gateway()[0].exchange()
    return [a for m in work._request_messages() for a in exchange.on_message(m)[0]]


def test_the_bench_request_is_routed_and_rewritten():
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    answers = [pb.ProcessingResponse.FromString(a) for a in _answers()]
    assert [a.WhichOneof("response") for a in answers] == ["request_headers", "request_body", "request_body"]
    assert answers[2].request_body.response.body_mutation.body.startswith(b'{"messages"')


@pytest.mark.parametrize(("status", "recorded"), [(200, (24, 24)), (503, (0, 24))])  # usage is counted either way
def test_the_bench_log_entries_count_as_answered_with_usage(status, recorded):
    from envoy.service.accesslog.v3 import als_pb2

    _, receiver, metrics = work.seed_gateway()  # as the bench wires it
    batch = als_pb2.StreamAccessLogsMessage.FromString(work._log_batch(_answers()[0]))
    for entry in batch.http_logs.log_entry:
        entry.response.response_code.value = status
    receiver.on_message(batch.SerializeToString())
    assert work._recorded(metrics) == recorded


def test_processor_work_is_measured():
    figures = work.processor_work_us(0.05)
    assert set(figures) == {"read_messages_us", "choose_and_rewrite_us", "access_log_entry_us"}
    assert all(v > 0 for v in figures.values())
