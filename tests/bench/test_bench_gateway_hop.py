"""The gateway-hop bench part (issue 33) runs: a sidecar's decision, the gateway over mutual TLS
and over plain HTTP side by side, every request answered, and the sidecar's connection to the
gateway reused (no TLS handshake per request)."""

from __future__ import annotations

import json

from benchmarks import gateway_hop


def test_a_short_run(tmp_path, capsys):
    assert gateway_hop.main(["--rounds", "1", "--seconds", "1", "--connections", "2", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "gateway-hop.json").read_text())
    assert set(summary["contenders"]) == {"sidecar", "gateway-mtls", "gateway-plain"}
    assert summary["errors"] == {"sidecar": 0, "gateway-mtls": 0, "gateway-plain": 0}
    assert all(figures["2"]["cpu_us_per_request"] > 0 for figures in summary["contenders"].values())
    assert summary["gateway_requests"] > 0 and summary["gateway_tls_handshakes"] <= 1
    assert {"gateway-mtls_over_sidecar", "gateway-plain_over_sidecar"} <= set(summary)
    assert "round 1 gateway-mtls" in capsys.readouterr().out
