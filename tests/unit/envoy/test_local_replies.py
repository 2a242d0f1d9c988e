"""Envoy's own answers in the gateway's JSON: a limit of requests in flight reached is a 503
`overloaded` with Retry-After, in the same words as the ext_proc's own refusal of that code."""

from __future__ import annotations

from extproc.envoy.local_replies import EXT_PROC_OVERFLOW, local_reply_config
from extproc.errors import OVERLOADED_CODE, OVERLOADED_HEADERS, OVERLOADED_TYPE
from extproc.policy.body_memory import Overloaded
from extproc.protocol import EXT_PROC_OVERFLOW_DETAILS

ENVOY_EXT_PROC_OVERFLOW = ("ext_proc_error_gRPC_error_14{upstream_connect_error_or_disconnect/reset_before_headers."
                           "_reset_reason:_overflow{upstream_reset_before_response_started{overflow}}}")


def overload_mapper() -> tuple[int, dict]:
    mappers = local_reply_config(30)["mappers"]
    (index,) = [i for i, m in enumerate(mappers) if m.get("status_code") == 503]
    return index, mappers[index]


def test_a_full_provider_cluster_or_ext_proc_cluster_is_answered_503_overloaded():
    _, mapper = overload_mapper()
    (flag, cel) = mapper["filter"]["or_filter"]["filters"]
    assert flag == {"response_flag_filter": {"flags": ["UO"]}}  # a provider cluster's circuit breakers
    assert cel["extension_filter"]["typed_config"]["expression"] == EXT_PROC_OVERFLOW
    assert mapper["headers_to_add"] == [{"header": {"key": "retry-after", "value": "1"},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]
    error = mapper["body_format_override"]["json_format"]["error"]
    assert (error["code"], error["type"]) == (OVERLOADED_CODE, OVERLOADED_TYPE) == ("overloaded", "server_error")
    assert "%" not in error["message"]  # no Envoy reason (an internal string) in the answer


def test_the_ext_proc_filter_matches_envoys_reason_for_an_overflow():
    """The CEL expression is built from the words the metrics read too (one rule, two readers)."""
    started, named = EXT_PROC_OVERFLOW_DETAILS
    assert ENVOY_EXT_PROC_OVERFLOW.startswith(started) and named in ENVOY_EXT_PROC_OVERFLOW
    assert f"startsWith('{started}')" in EXT_PROC_OVERFLOW and f"contains('{named}')" in EXT_PROC_OVERFLOW


def test_it_comes_before_the_answers_by_status():
    """Envoy uses the first mapper that matches: by status, a provider's overflow would read as an
    unreachable provider and the ext_proc's as a 500."""
    index, _ = overload_mapper()
    mappers = local_reply_config(30)["mappers"]
    by_status = [i for i, m in enumerate(mappers) if "status_code_filter" in m["filter"]]
    assert by_status and index < min(by_status)


def test_the_ext_proc_refuses_with_the_same_code_type_and_retry_after():
    refusal = Overloaded(10, 5)
    assert (refusal.status, refusal.code, refusal.kind) == (503, OVERLOADED_CODE, OVERLOADED_TYPE)
    assert refusal.headers == OVERLOADED_HEADERS
