"""The answer filter: Envoy's side of processing a request's answer (docs/api.md, "Streamed or
not"; the data plane's side is `extproc.dataplane.answer_exchange`).

A second ext_proc filter, right after the request's own, that runs only for requests the ext_proc
marked with ANSWER_HEADER (a matcher on that header skips it for every other request: one header
lookup). It processes nothing of the request; it sends the answer's headers and, where the
exchange asks for it, the whole answer body, on a gRPC stream of its own (its own authority), so
the request's exchange still ends as soon as the request is rewritten.

It is off by default and turned on by the gateway's own routes (`ENABLED`, on their virtual
host): an answer Envoy makes without a route, such as the 400 to a request that is not valid HTTP,
must not wait for it (its matcher has no request headers to look at there, and Envoy resets the
connection instead of answering: seen end to end).

Why a second filter: the first ext_proc's per-request `mode_override` is honoured only in an
answer to the request headers sent before the body; ours is sent once the body is whole (one
round trip), and Envoy 1.40 then ignores the override (tried end to end).

On the answer's way back, filters run in reverse order: the usage readers (json_to_metadata,
sse_to_metadata) see the provider's own answer before this filter converts it, so tokens are
read from what the provider sent.
"""

from __future__ import annotations

# Imported for their side effect: registering the types named by `@type` below.
from envoy.extensions.common.matching.v3 import extension_matcher_pb2  # noqa: F401
from envoy.extensions.filters.common.matcher.action.v3 import skip_action_pb2  # noqa: F401

from ..protocol import ANSWER_AUTHORITY, ANSWER_HEADER, BUFFER_MARGIN, EXT_PROC_CLUSTER, METADATA_NAMESPACE

ANSWER_FILTER = "llm_gateway.answer"
# How long the ext_proc may take over one message of an answer (converting a whole answer is
# a few milliseconds per megabyte).
ANSWER_MESSAGE_TIMEOUT = "5s"


def _skip_unmarked() -> dict:
    """The answer filter's matcher: skip it for every request the ext_proc did not mark."""
    unmarked = {"not_matcher": {"single_predicate": {
        "input": {"name": "answer", "typed_config": {
            "@type": "type.googleapis.com/envoy.type.matcher.v3.HttpRequestHeaderMatchInput",
            "header_name": ANSWER_HEADER}},
        "value_match": {"exact": "1"},
    }}}
    return {"matcher_list": {"matchers": [{
        "predicate": unmarked,
        "on_match": {"action": {"name": "skip", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.common.matcher.action.v3.SkipFilter"}}},
    }]}}


# The per-route (here: per virtual host) config that turns the answer filter on, with the same
# matcher (Envoy wants a config beside `disabled: false`).
ENABLED = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "disabled": False,
           "config": {"@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcherPerRoute",
                      "xds_matcher": _skip_unmarked()}}


def answer_filter(body_limit: int) -> dict:
    """The answer filter of the listener's chain (after the request's ext_proc)."""
    ext_proc = {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExternalProcessor",
        "grpc_service": {"envoy_grpc": {"cluster_name": EXT_PROC_CLUSTER, "authority": ANSWER_AUTHORITY,
                                        "max_receive_message_length": body_limit + BUFFER_MARGIN}},
        # the answer is in the client's format, or no answer: never the wrong format silently
        "failure_mode_allow": False,
        "message_timeout": ANSWER_MESSAGE_TIMEOUT,
        # the answer's headers come first; the exchange reads them and asks for the body (held
        # whole, up to the connection's buffer limit) only where it converts or checks it, or for
        # its pieces as they come (a stream a data policy checks, or translated into another API's,
        # event by event: `mode_override` STREAMED)
        "processing_mode": {
            "request_header_mode": "SKIP",
            "response_header_mode": "SEND",
            "request_body_mode": "NONE",
            "response_body_mode": "BUFFERED",
            "request_trailer_mode": "SKIP",
            "response_trailer_mode": "SKIP",
        },
        "allow_mode_override": True,
        "mutation_rules": {"allow_all_routing": True, "allow_envoy": True},
        # what the client asked for comes in with the request's decision; what a data policy did to
        # the answer (the access log's `data_answer`) and a translated answer's usage (Envoy's
        # readers know OpenAI's shapes only) go out
        "metadata_options": {"forwarding_namespaces": {"untyped": [METADATA_NAMESPACE]},
                             "receiving_namespaces": {"untyped": [METADATA_NAMESPACE]}},
        "stat_prefix": "answer",
    }
    return {"name": ANSWER_FILTER, "disabled": True, "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.common.matching.v3.ExtensionWithMatcher",
        "extension_config": {"name": "envoy.filters.http.ext_proc", "typed_config": ext_proc},
        "xds_matcher": _skip_unmarked(),
    }}
