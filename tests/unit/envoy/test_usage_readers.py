"""The answer's readers in Envoy: an event stream's model, usage and error read into the same
metadata keys as a JSON answer's, with no ext_proc reading answers."""

from __future__ import annotations

import json

from extproc.envoy.bootstrap import BootstrapOptions, bootstrap
from support.envoy_api import hcm


def test_event_streams_read_by_envoy_into_the_same_metadata_keys():
    reader = next(f for f in hcm(bootstrap(BootstrapOptions()))["http_filters"]
                  if f["name"] == "llm_gateway.event_stream")["typed_config"]
    assert reader["@type"] == "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata"
    parser = reader["response_rules"]["content_parser"]["typed_config"]
    written = [(tuple(s["key"] for s in r["rule"]["selectors"]), r["rule"]["on_present"]["metadata_namespace"],
                r["rule"]["on_present"]["key"]) for r in parser["rules"]]
    assert written == [(("model",), "llm_gateway", "response_model"),
                       (("usage", "prompt_tokens"), "llm_gateway", "prompt_tokens"),
                       (("usage", "completion_tokens"), "llm_gateway", "completion_tokens"),
                       (("usage", "total_tokens"), "llm_gateway", "total_tokens"),
                       (("usage", "prompt_tokens_details", "cached_tokens"), "llm_gateway", "cached_tokens"),
                       (("error", "code"), "llm_gateway", "stream_error"),
                       (("error", "type"), "llm_gateway", "stream_error")]  # the type, when there is one, wins
    # every event names the model: it is written once, not once per event
    assert [r.get("stop_processing_after_matches", 0) for r in parser["rules"]] == [1, 0, 0, 0, 0, 0, 0]
    # no ext_proc reads answers: one ext_proc filter, for requests
    boot = bootstrap(BootstrapOptions())
    assert [f["name"] for f in hcm(boot)["http_filters"]].count("envoy.filters.http.ext_proc") == 1
    assert "ExtProc" not in json.dumps(reader) and "ExternalProcessor" not in json.dumps(reader)
