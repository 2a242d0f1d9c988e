"""Envoy's API in Python for the tests of the Envoy config: every `@type` the bootstrap names is
registered on import, the bootstrap parsed as Envoy's API, and its parts found."""

from __future__ import annotations

import copy

from envoy.config.bootstrap.v3 import bootstrap_pb2
from envoy.extensions.access_loggers.file.v3 import file_pb2  # noqa: F401
from envoy.extensions.access_loggers.filters.cel.v3 import cel_pb2  # noqa: F401  (registers @type)
from envoy.extensions.access_loggers.grpc.v3 import als_pb2  # noqa: F401
from envoy.extensions.filters.http.buffer.v3 import buffer_pb2  # noqa: F401
from envoy.extensions.filters.http.ext_proc.v3 import ext_proc_pb2  # noqa: F401
from envoy.extensions.filters.http.health_check.v3 import health_check_pb2  # noqa: F401
from envoy.extensions.filters.http.json_to_metadata.v3 import json_to_metadata_pb2  # noqa: F401
from envoy.extensions.filters.http.router.v3 import router_pb2  # noqa: F401
from envoy.extensions.filters.listener.original_dst.v3 import original_dst_pb2  # noqa: F401
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2  # noqa: F401
from envoy.extensions.transport_sockets.tls.v3 import tls_pb2  # noqa: F401
from google.protobuf import json_format


def parse_bootstrap(boot: dict) -> bootstrap_pb2.Bootstrap:
    """The bootstrap as Envoy's API, in Python: sse_to_metadata is newer than xds-protos, so its
    config is swapped for an empty known filter here (the real Envoy checks it:
    `test_envoy_accepts_the_bootstrap`)."""
    boot = copy.deepcopy(boot)
    for f in hcm(boot)["http_filters"]:
        if f["typed_config"]["@type"].endswith("SseToMetadata"):
            f["typed_config"] = {"@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer"}
    return json_format.ParseDict(boot, bootstrap_pb2.Bootstrap())


def hcm(boot: dict) -> dict:
    listener = boot["static_resources"]["listeners"][0]
    return listener["filter_chains"][0]["filters"][0]["typed_config"]


def ext_proc(boot: dict) -> dict:
    return next(f for f in hcm(boot)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")["typed_config"]
