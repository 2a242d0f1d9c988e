"""Cluster dicts to protobuf, fast when there are thousands of them.

`json_format.ParseDict` takes a few hundred microseconds per provider cluster (its TLS context,
protocol options and resolver are each an `Any`): 2,000 providers (4,000 clusters with their
failover twins) cost about a second of the control plane's start. But provider clusters differ
only in their name and their host: the rest is the same for all clusters of one kind. So each
kind is converted once, with placeholders of the same lengths in place of the name and the host
(a run of \\x01 and of \\x02), and serialized; a cluster is that template's bytes with the
placeholders replaced, parsed back. Same-length strings keep every length prefix of the wire
form valid. A template whose placeholders are not all found exactly once per place they were
put in (never seen; it would mean a string the wire form changes) is not used: such clusters
are converted the slow way.
"""

from __future__ import annotations

import json
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2

from .clusters import to_cluster_proto

NAME_MARK, HOST_MARK = "\x01", "\x02"


def _substitute(value: Any, pairs: tuple[tuple[str, str], ...]) -> tuple[Any, int]:
    """`value` with each of `pairs`' first strings replaced by its second in every string leaf
    (not in keys); and how many replacements were made."""
    if isinstance(value, str):
        count = 0
        for old, new in pairs:
            found = value.count(old)
            if found:
                value = value.replace(old, new)
                count += found
        return value, count
    if isinstance(value, dict):
        out, total = {}, 0
        for key, item in value.items():
            out[key], count = _substitute(item, pairs)
            total += count
        return out, total
    if isinstance(value, list):
        items, total = [], 0
        for item in value:
            converted, count = _substitute(item, pairs)
            items.append(converted)
            total += count
        return items, total
    return value, 0


class ClusterProtos:
    """Converts clusters through per-kind templates (see the module's docstring)."""

    def __init__(self) -> None:
        self._templates: dict[str, bytes | None] = {}

    def convert(self, cluster: dict, name: str, host: str) -> cluster_pb2.Cluster:
        if not (name and host and name.isascii() and host.isascii()) or name == host:
            return to_cluster_proto(cluster)
        name_mark, host_mark = NAME_MARK * len(name), HOST_MARK * len(host)
        # the longer first: one may hold the other (a host without dots inside its cluster's name)
        pairs = ((name, name_mark), (host, host_mark)) if len(name) >= len(host) else (
            (host, host_mark), (name, name_mark))
        shape, marks = _substitute(cluster, pairs)
        key = json.dumps(shape, sort_keys=True)
        template = self._templates.get(key, b"")
        if template == b"":
            data = to_cluster_proto(shape).SerializeToString(deterministic=True)
            found = data.count(name_mark.encode()) + data.count(host_mark.encode())
            template = self._templates[key] = data if found == marks else None
        if template is None:
            return to_cluster_proto(cluster)
        wire = template.replace(name_mark.encode(), name.encode()).replace(host_mark.encode(), host.encode())
        return cluster_pb2.Cluster.FromString(wire)
