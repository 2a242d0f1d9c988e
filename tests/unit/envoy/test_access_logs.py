"""Envoy's access logs: the gRPC log to the metrics, with the streamed answer's time points, and
the optional file log, one line per request."""

from __future__ import annotations

import pytest

from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from extproc.protocol import ACCESS_LOG_CLUSTER
from support.envoy_api import hcm


def test_streamed_answer_timings_sent_to_the_metrics_as_time_points():
    (grpc_log, *_) = hcm(bootstrap(BootstrapOptions()))["access_log"]
    config = grpc_log["typed_config"]
    tags = {t["tag"]: t["value"] for t in config["common_config"]["custom_tags"]}
    assert tags == {"ttft_us": "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:us)%",
                    "generation_us": "%COMMON_DURATION(US_RX_BODY_BEG:US_RX_END:us)%"}
    assert config["additional_response_headers_to_log"] == ["content-type"]


@pytest.mark.parametrize("access_log", ["/dev/stdout", "/tmp/x.log", None])
def test_access_logs(access_log):
    logs = hcm(bootstrap(BootstrapOptions(access_log=access_log)))["access_log"]
    assert logs[0]["typed_config"]["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == ACCESS_LOG_CLUSTER
    if access_log is None:
        assert len(logs) == 1
    else:
        # one line per request: a streamed request's line (the ext_proc's `stream` decision) has its
        # timings, a priced answer's line its cost; each line's filter is (streamed?) and (priced?)
        assert len(logs) == 5
        by_kind = {}
        for log in logs[1:]:
            streamed_test, priced_test = log["filter"]["and_filter"]["filters"]
            stream_match = streamed_test["metadata_filter"]
            assert stream_match["matcher"]["path"] == [{"key": "stream"}]
            streamed = stream_match["matcher"]["value"] == {"bool_match": True}
            assert stream_match["match_if_key_not_found"] is not streamed  # no decision: plain
            priced = "and_filter" in priced_test
            by_kind[(streamed, priced)] = log
            fmt = log["typed_config"]["log_format"]["json_format"]
            assert log["typed_config"]["path"] == access_log
            for key in ("route", "rule", "provider", "request_model", "response_model", "prompt_tokens",
                        "completion_tokens", "total_tokens", "cached_tokens", "cost", "currency", "ttft_ms",
                        "generation_ms", "status", "duration_ms", "trace_id"):
                assert key in fmt
            assert fmt["cost"].startswith("%CEL(") is priced
            assert fmt["ttft_ms"].startswith("%COMMON_DURATION") is streamed
        assert set(by_kind) == {(False, False), (False, True), (True, False), (True, True)}
        priced_filters = by_kind[(False, True)]["filter"]["and_filter"]["filters"][1]["and_filter"]["filters"]
        assert [f["metadata_filter"]["matcher"]["path"] for f in priced_filters] == [[{"key": "currency"}],
                                                                                     [{"key": "prompt_tokens"}]]
        unpriced = by_kind[(False, False)]["filter"]["and_filter"]["filters"][1]["or_filter"]["filters"]
        assert all(f["metadata_filter"]["match_if_key_not_found"] for f in unpriced)  # no currency, or no usage
