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
        # one line per request: a streamed request's line (the ext_proc's `stream` decision) has its timings
        (_, plain, streamed) = logs
        stream_test, plain_test = streamed["filter"]["metadata_filter"], plain["filter"]["metadata_filter"]
        assert stream_test["matcher"]["path"] == plain_test["matcher"]["path"] == [{"key": "stream"}]
        assert (stream_test["matcher"]["value"] == {"bool_match": True}
                and plain_test["matcher"]["value"] == {"bool_match": False})
        assert not stream_test["match_if_key_not_found"] and plain_test["match_if_key_not_found"]  # no decision: plain
        for log in (plain, streamed):
            fmt = log["typed_config"]["log_format"]["json_format"]
            assert log["typed_config"]["path"] == access_log
            for key in ("route", "rule", "provider", "request_model", "response_model", "prompt_tokens",
                        "completion_tokens", "total_tokens", "ttft_ms", "generation_ms", "status", "duration_ms"):
                assert key in fmt
        assert streamed["typed_config"]["log_format"]["json_format"]["ttft_ms"] == \
            "%COMMON_DURATION(DS_RX_BEG:US_RX_BODY_BEG:ms)%"
        assert plain["typed_config"]["log_format"]["json_format"]["ttft_ms"].startswith("%DYNAMIC_METADATA")
