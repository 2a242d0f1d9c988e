"""The hand-written wire form (extproc.protobuf_wire): every piece parses back with protobuf to
what the protobuf objects would have said, at every length a varint changes size. (A cached budget
answer is exactly the answer worked out afresh: policy/test_budget_gate.py.)"""

from __future__ import annotations

import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import json_format, struct_pb2

from extproc import protobuf_wire as wire

LENGTHS = [0, 1, 60, 100, 117, 118, 119, 120, 125, 126, 127, 128, 200, 5000, 70000]


@pytest.mark.parametrize("size", LENGTHS)
def test_string_entries_parse_back_at_every_length(size):
    for key in ("k", "ratelimit_remaining_tokens", "x" * 130):
        parsed = struct_pb2.Struct.FromString(wire.string_entry(key, "v" * size))
        assert dict(parsed.fields.items())[key].string_value == "v" * size


def test_struct_values_of_each_kind():
    entries = (wire.string_entry("s", "é") + wire.bool_entry("t", True) + wire.bool_entry("f", False)
               + wire.struct_entry("l", wire.list_value([wire.string_value("a"), wire.string_value("b" * 300)])))
    assert json_format.MessageToDict(struct_pb2.Struct.FromString(entries)) == {
        "s": "é", "t": True, "f": False, "l": ["a", "b" * 300]}


@pytest.mark.parametrize("size", LENGTHS)
def test_dynamic_metadata_is_one_namespace_holding_the_entries(size):
    response = pb.ProcessingResponse.FromString(
        wire.dynamic_metadata("llm_gateway", wire.string_entry("host", "h" * size) + wire.bool_entry("stream", True)))
    assert json_format.MessageToDict(response) == {
        "dynamicMetadata": {"llm_gateway": {"host": "h" * size, "stream": True}}}


@pytest.mark.parametrize("size", LENGTHS)
def test_header_and_body_answers_parse_back(size):
    headers = pb.ProcessingResponse.FromString(wire.request_headers_set(
        wire.header_option("content-length", str(size).encode()) + wire.header_option("x-long", b"v" * size)))
    options = headers.request_headers.response.header_mutation.set_headers
    overwrite = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
    assert [(o.header.key, o.header.raw_value, o.append_action) for o in options] == [
        ("content-length", str(size).encode(), overwrite), ("x-long", b"v" * size, overwrite)]
    body = pb.ProcessingResponse.FromString(wire.request_body_replaced(b"{" * size))
    assert body.request_body.response.body_mutation.body == b"{" * size


def test_appended_parts_merge_into_one_answer():
    """A prebuilt answer (serialized by protobuf) and parts appended per request read as one."""
    prebuilt = pb.ProcessingResponse()
    prebuilt.request_headers.response.header_mutation.set_headers.add().header.key = "first"
    prebuilt.request_headers.response.header_mutation.remove_headers.append("gone")
    prebuilt.request_headers.response.clear_route_cache = True
    merged = pb.ProcessingResponse.FromString(
        prebuilt.SerializeToString() + wire.request_headers_set(wire.header_option("second", b"2"))
        + wire.dynamic_metadata("ns", wire.string_entry("k", "v")))
    common = merged.request_headers.response
    assert [o.header.key for o in common.header_mutation.set_headers] == ["first", "second"]
    assert list(common.header_mutation.remove_headers) == ["gone"] and common.clear_route_cache
    assert merged.dynamic_metadata.fields["ns"].struct_value.fields["k"].string_value == "v"
