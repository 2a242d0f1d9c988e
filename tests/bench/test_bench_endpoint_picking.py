"""The endpoint-picking bench part (benchmarks/endpoint_picking.py): its workload is the skewed one
the issue asks for, and a short run of it works end to end (no figures asserted: timings on a
shared machine mean little)."""

from __future__ import annotations

import json

from benchmarks import endpoint_picking
from benchmarks.endpoint_picking import DOCUMENTS, SPEC, capacity_rps, service_s, workload


def test_the_workload_is_skewed_shares_prefixes_and_mixes_lengths():
    requests = workload(60, 50)
    assert 2500 < len(requests) < 3500  # Poisson at 50/s
    assert all(a.at < b.at for a, b in zip(requests, requests[1:], strict=False))
    documents = [r.prompt.split("\n\nQuestion")[0] for r in requests if "\n\nQuestion" in r.prompt]
    assert 0.6 < len(documents) / len(requests) < 0.8
    counts = sorted((documents.count(d) for d in set(documents)), reverse=True)
    assert len(counts) == DOCUMENTS and counts[0] > 3 * counts[-1]  # Zipf: a hot document, cold ones
    lengths = sorted(len(r.prompt) for r in requests)
    assert lengths[-1] > 20 * lengths[0]
    # the servers' prefix caches hold a few documents, not all of them
    cache_chars = SPEC.cache_blocks * 256
    assert 3 * max(map(len, set(documents))) < cache_chars < sum(map(len, set(documents)))
    assert capacity_rps() == SPEC.slots * 4 / (sum(map(service_s, workload(200, 10, seed=1)))
                                               / len(workload(200, 10, seed=1)))


def test_a_short_run_compares_the_picker_with_round_robin(tmp_path, capsys):
    assert endpoint_picking.main(["--seconds", "4", "--out", str(tmp_path), "--contenders",
                                  "round_robin,least_request,picker"]) == 0
    summary = json.loads((tmp_path / "endpoint-picking.json").read_text())
    assert set(summary["contenders"]) == {"round_robin", "least_request", "picker"}
    for name, figures in summary["contenders"].items():
        assert figures["errors"] == 0 and figures["completed"] > 0, (name, figures)
        assert figures["ttft_ms"]["90"] is not None
        assert sum(s["requests"] for s in figures["per_server"]) >= figures["completed"]
    assert summary["p90_ratio_vs_round_robin"] is not None
    assert "picker p90 / round robin p90" in capsys.readouterr().out
