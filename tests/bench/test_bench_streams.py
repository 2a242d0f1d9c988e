"""The streaming benchmark's pieces that decide figures: the floor's bootstrap (checked by the real
Envoy), percentiles of event delays, the paced provider's events as sse_to_metadata reads them."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from benchmarks import floor, measure, streams
from extproc.ops.up import envoy_binary


def test_floor_bootstrap_is_the_gateways_with_static_providers(tmp_path):
    cluster = {"name": "llm_provider_x", "type": "STATIC", "connect_timeout": "1s",
               "load_assignment": {"cluster_name": "llm_provider_x", "endpoints": [{"lb_endpoints": [{"endpoint": {
                   "address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}]}}
    boot = floor.floor_bootstrap(1, 2, 3, {"x.example": cluster}, str(tmp_path / "access.log"))
    hcm = boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    assert [f["name"] for f in hcm["http_filters"]][0] == "envoy.filters.http.ext_proc"
    assert "dynamic_resources" not in boot
    assert hcm["route_config"]["virtual_hosts"][0]["domains"] == ["x.example"]
    path = tmp_path / "floor.json"
    path.write_text(json.dumps(boot))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([5.0], 0.99, 5.0), (list(range(100)), 0.99, 99), (list(range(100)), 0.5, 50), ([3, 1, 2], 0.0, 1),
    ([], 0.5, None)])
def test_percentile(values, q, expected):
    got = measure.percentile(values, q)
    assert (got != got) if expected is None else got == expected  # nan for no values


def test_paced_events_carry_their_send_time_and_are_openai_chunks():
    from extproc.testing.stream_provider import Answer, StreamProvider

    data = StreamProvider.event(0, Answer(model="paced-model"))
    assert data.startswith(b"data: ") and data.endswith(b"\n\n")
    event = data[len(b"data: "):-2].decode()
    sent = int(streams._SENT.search(event.encode()).group(1))
    assert 0 < sent <= time.monotonic_ns()
    parsed = json.loads(event)
    assert parsed["model"] == "paced-model" and parsed["choices"][0]["delta"]["content"]
    assert re.fullmatch(r"\{.*\}", event)


def test_the_h2_library_copy_serves_with_the_library(tmp_path):
    """scripts/bench --h2-library measures the copy's HTTP/2 server only if the data plane reaches
    it: `up` listens through grpc_h2.serve_unix, `serve` through grpc_h2.serve."""
    from benchmarks.contenders import h2_library_source

    tree = h2_library_source(tmp_path)
    check = ("from extproc.ops import data_plane; g = data_plane.grpc_h2; "
             "print(g.__file__, g.serve.__module__, g.serve_unix.__module__)")
    out = subprocess.run([sys.executable, "-c", check], cwd=tree, env={**os.environ, "PYTHONPATH": str(tree)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(tree / "extproc" / "dataplane" / "grpc_h2.py"),
                                  "extproc.dataplane.h2_library_server", "extproc.dataplane.h2_library_server"]
