"""Protobuf wire form, written by hand for the few messages the request path answers with.

Building protobuf objects in Python and serializing them cost the ext_proc more per request
than everything it decides (see docs/performance.md). The answers it sends are mostly the same
bytes for every request to a target: those are serialized once, with protobuf, and what varies
per request (the body's length, the request's model, the budget's numbers) is appended in wire
form. A parser merges repeated occurrences of a message field, so `prefix + more` reads as one
message with both parts. Map entries do not merge (the last entry of a key wins): a Struct's
entries are therefore always written whole, inside one `llm_gateway` entry.

Tests parse every answer back with protobuf (tests/unit/test_protobuf_wire.py, tests/unit/dataplane/test_processor.py).
"""

from __future__ import annotations

_SMALL = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: `tag` is its key byte ((number << 3) | 2)."""
    n = len(payload)
    return tag + (_SMALL[n] if n < 128 else varint(n)) + payload


# --- google.protobuf.Struct: `fields` (1) entries of key (1) and Value (2); a Value is a number
# (2, double), a string (3), a bool (4), a Struct (5) or a list (6: ListValue, values (1)).

_KEYS: dict[str, bytes] = {}  # a map entry's key part, per key


def _key(key: str) -> bytes:
    prefix = _KEYS.get(key)
    if prefix is None:
        prefix = _KEYS[key] = field(b"\x0a", key.encode())
    return prefix


def struct_entry(key: str, value: bytes) -> bytes:
    """`key: value` as a Struct map entry; `value` is an encoded google.protobuf.Value."""
    return field(b"\x0a", _key(key) + field(b"\x12", value))


def string_value(text: str) -> bytes:
    return field(b"\x1a", text.encode())


def list_value(values: list[bytes]) -> bytes:
    """A ListValue of encoded Values."""
    return field(b"\x32", b"".join(field(b"\x0a", v) for v in values))


def struct_value(entries: bytes) -> bytes:
    return field(b"\x2a", entries)


def string_entry(key: str, text: str) -> bytes:
    """`key: text` as a Struct map entry."""
    raw = text.encode()
    prefix = _key(key)
    n = len(raw)
    if len(prefix) + n + 4 < 128:  # every length fits in one byte: the common case, inline
        return b"".join((b"\x0a", _SMALL[len(prefix) + n + 4], prefix, b"\x12", _SMALL[n + 2], b"\x1a", _SMALL[n], raw))
    return struct_entry(key, field(b"\x1a", raw))


def bool_entry(key: str, value: bool) -> bytes:
    return struct_entry(key, b"\x20\x01" if value else b"\x20\x00")


def dynamic_metadata(namespace: str, entries: bytes) -> bytes:
    """ProcessingResponse.dynamic_metadata (8): one namespace, whose Struct holds `entries`."""
    return field(b"\x42", struct_entry(namespace, struct_value(entries)))


# --- envoy.service.ext_proc.v3.ProcessingResponse and what it holds

def header_option(key: str, raw_value: bytes) -> bytes:
    """One HeaderMutation.set_headers (1) entry: a HeaderValueOption whose header (1) is a
    HeaderValue of key (1) and raw_value (3), overwriting (append_action (3) = 2)."""
    return field(b"\x0a", field(b"\x0a", field(b"\x0a", key.encode()) + field(b"\x1a", raw_value)) + b"\x18\x02")


def request_headers_set(options: bytes) -> bytes:
    """ProcessingResponse.request_headers(1).response(1).header_mutation(2) of `options`: one or
    more set_headers entries (as `header_option` writes them)."""
    return field(b"\x0a", field(b"\x0a", field(b"\x12", options)))


def request_body_replaced(body: bytes) -> bytes:
    """ProcessingResponse.request_body(3).response(1).body_mutation(3).body(1)."""
    return field(b"\x1a", field(b"\x0a", field(b"\x1a", field(b"\x0a", body))))


def response_body_replaced(body: bytes) -> bytes:
    """ProcessingResponse.response_body(4).response(1).body_mutation(3).body(1): one chunk of an
    answer replaced (a checked stream's chunk; empty: nothing of it goes on)."""
    return field(b"\x22", field(b"\x0a", field(b"\x1a", field(b"\x0a", body))))
