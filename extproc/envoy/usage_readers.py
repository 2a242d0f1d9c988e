"""Envoy's native readers of answers: the model and usage of a JSON answer (json_to_metadata)
and of a server-sent-event stream, error events included (sse_to_metadata), written into the
`llm_gateway` dynamic metadata the access logs read. No ext_proc round trip per answer or event."""

from __future__ import annotations

from typing import Any

from ..protocol import METADATA_NAMESPACE


def usage_from_json() -> dict:
    """Envoy reads model and usage of a JSON answer itself (no extra ext_proc message)."""
    def rule(path: list[str], key: str, kind: str) -> dict:
        return {"selectors": [{"key": p} for p in path],
                "on_present": {"metadata_namespace": METADATA_NAMESPACE, "key": key, "type": kind}}

    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.json_to_metadata.v3.JsonToMetadata",
        "response_rules": {
            "rules": [rule(["model"], "response_model", "STRING"),
                      rule(["usage", "prompt_tokens"], "prompt_tokens", "NUMBER"),
                      rule(["usage", "completion_tokens"], "completion_tokens", "NUMBER"),
                      rule(["usage", "total_tokens"], "total_tokens", "NUMBER"),
                      # cached prompt tokens (OpenAI's and DashScope's field), priced apart
                      rule(["usage", "prompt_tokens_details", "cached_tokens"], "cached_tokens", "NUMBER")],
            "allow_content_types_regex": {"regex": "application/json.*"},
        },
    }


def usage_from_event_stream() -> dict:
    """Envoy reads model, usage and error events of a server-sent-event answer itself, in C++, as
    the events pass: no round trip per event. Only `text/event-stream` answers are read (the
    filter's own check). The type is newer than xds-protos, so it is written here by its `@type`
    and checked by Envoy when it loads the bootstrap."""
    def rule(path: list[str], key: str, kind: str, once: bool = False) -> dict[str, Any]:
        config: dict[str, Any] = {"rule": {"selectors": [{"key": p} for p in path],
                           "on_present": {"metadata_namespace": METADATA_NAMESPACE, "key": key, "type": kind}}}
        if once:  # every event names the model: writing it once spares a metadata write per event
            config["stop_processing_after_matches"] = 1
        return config

    return {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.sse_to_metadata.v3.SseToMetadata",
        "response_rules": {
            "content_parser": {
                "name": "envoy.content_parsers.json",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.content_parsers.json.v3.JsonContentParser",
                    # each event that has a field overwrites the last: the usage event is the last
                    "rules": [rule(["model"], "response_model", "STRING", once=True),
                              rule(["usage", "prompt_tokens"], "prompt_tokens", "NUMBER"),
                              rule(["usage", "completion_tokens"], "completion_tokens", "NUMBER"),
                              rule(["usage", "total_tokens"], "total_tokens", "NUMBER"),
                              rule(["usage", "prompt_tokens_details", "cached_tokens"], "cached_tokens", "NUMBER"),
                              # an error event mid-stream: its code, else its type (read after)
                              rule(["error", "code"], "stream_error", "STRING"),
                              rule(["error", "type"], "stream_error", "STRING")],
                },
            },
            "max_event_size": 1 << 20,
        },
    }
