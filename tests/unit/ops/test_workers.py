"""Worker processes (extproc.ops.workers): how many, each one's share of the cap, and /metrics summed."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from extproc.ops import workers as workers
from extproc.ops.workers import MergedRegistry, flatten_families, plan

MIB = 1 << 20


@pytest.mark.parametrize(("requested", "cpus", "cap", "limit", "expected"), [
    pytest.param(None, 4, 256 * MIB, 8 * MIB, (4, 64 * MIB), id="default-one-per-cpu"),
    pytest.param(None, 64, 256 * MIB, 8 * MIB, (32, 8 * MIB), id="default-lowered-so-a-share-holds-a-body"),
    pytest.param(2, 64, 256 * MIB, 8 * MIB, (2, 128 * MIB), id="asked-for"),
    pytest.param(None, 1, 256 * MIB, 8 * MIB, (1, 256 * MIB), id="one-cpu-no-workers"),
])
def test_plan(monkeypatch, requested, cpus, cap, limit, expected):
    monkeypatch.setattr(workers, "default_workers", lambda: cpus)
    count, share, note = plan(requested, cap, limit)
    assert (count, share) == expected
    assert (note is not None) == (requested is None and cpus > cap // limit)


class FakePool:
    def __init__(self, *registries):
        self.registries = registries

    def families(self):
        return [flatten_families(r.collect()) for r in self.registries]


def process_registry(requests: int, held: int, worker: str) -> CollectorRegistry:
    r = CollectorRegistry()
    Counter("llm_gateway_requests", "requests", ["outcome"], registry=r).labels("success").inc(requests)
    Gauge("llm_gateway_body_bytes_in_flight", "held", registry=r).set(held)
    Counter("llm_gateway_ext_proc_streams_opened", "by process", ["worker"], registry=r).labels(worker).inc(requests)
    return r


def test_metrics_of_all_processes_are_summed_and_per_worker_series_kept():
    merged = MergedRegistry(process_registry(3, 100, "0"), FakePool(process_registry(5, 20, "1"),
                                                                   process_registry(0, 0, "2")))
    text = generate_latest(merged).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples[("llm_gateway_requests_total", (("outcome", "success"),))] == 8
    assert samples[("llm_gateway_body_bytes_in_flight", ())] == 120
    opened = {dict(labels)["worker"]: v for (name, labels), v in samples.items()
              if name == "llm_gateway_ext_proc_streams_opened_total"}
    assert opened == {"0": 3, "1": 5, "2": 0}
    assert text.count("# TYPE llm_gateway_requests_total counter") == 1  # one family, not one per process


def test_without_workers_started_yet_only_this_process_is_shown():
    text = generate_latest(MergedRegistry(process_registry(3, 0, "0"))).decode()
    assert "llm_gateway_requests_total" in text
