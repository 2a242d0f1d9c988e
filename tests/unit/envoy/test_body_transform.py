"""The headers-only path's filters (`extproc.envoy.body_transform`, issue 32's measured prototype):
where they go around the ext_proc, and that the real Envoy accepts them in the gateway's bootstrap."""

from __future__ import annotations

import json
import subprocess

from extproc.envoy.body_transform import HEADERS_ONLY_MODE, INTERNAL_HEADERS, headers_only_filters
from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.ops.up import envoy_binary


def _hcm(boot: dict) -> dict:
    return boot["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]


def test_the_filters_go_around_the_ext_proc_which_gets_no_body():
    boot = bootstrap(BootstrapOptions())
    before = _hcm(boot)["http_filters"]
    after = headers_only_filters(before)
    names = [f["name"] for f in after]
    at = names.index("envoy.filters.http.ext_proc")
    assert names[at - 2:at + 2] == ["llm_gateway.body_strip", "llm_gateway.body_read", "envoy.filters.http.ext_proc",
                                    "llm_gateway.body_write"]
    ext_proc = after[at]["typed_config"]
    assert ext_proc["processing_mode"] == HEADERS_ONLY_MODE
    assert "send_body_without_waiting_for_header_response" not in ext_proc
    # everything else as it was, the bootstrap's own filters untouched
    assert [f for f in after if not f["name"].startswith("llm_gateway.body_")
            and f["name"] != "envoy.filters.http.ext_proc"] == [f for f in before
                                                                if f["name"] != "envoy.filters.http.ext_proc"]
    assert before[[f["name"] for f in before].index("envoy.filters.http.ext_proc")]["typed_config"][
        "processing_mode"]["request_body_mode"] == "STREAMED"
    stripped = after[at - 2]["typed_config"]["mutations"]["request_mutations"]
    assert {m["remove"] for m in stripped} == set(INTERNAL_HEADERS)


def test_envoy_accepts_the_bootstrap_with_them(tmp_path):
    """The experiment's switch (`headers_only`) gives the bootstrap these filters, which Envoy accepts."""
    boot = bootstrap(BootstrapOptions(headers_only=True))
    assert _hcm(boot)["http_filters"] == headers_only_filters(_hcm(bootstrap(BootstrapOptions()))["http_filters"])
    path = tmp_path / "bootstrap.json"
    path.write_text(json.dumps(boot))
    result = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr
