"""The ext_proc's answer to the first attempt of a request: a rule with `retries` sends it to its
providers' failover clusters with the attempt order and the retry policy; other rules do not."""

from __future__ import annotations

from support.failover_config import CONFIG, compiled


def _exchange_messages(table, extra=None, body=None):
    import json as _json

    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.processor import ExternalProcessor
    from extproc.policy.table import TableHolder

    pairs = {":method": "POST", ":path": "/", ":authority": "svc", **(extra or {})}
    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(
        headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode()) for k, v in pairs.items()])))
    raw = body if body is not None else _json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    body_msg = pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True))
    exchange = ExternalProcessor(TableHolder(table), draw=lambda: 0.0).exchange()
    exchange.on_request(headers)
    responses, done = exchange.on_request(body_msg)
    mutation = responses[0].request_headers.response.header_mutation
    return ({o.header.key: o.header.raw_value.decode() for o in mutation.set_headers}, list(mutation.remove_headers))


def test_only_rules_with_retries_use_the_failover_clusters():
    """A rule with `retries` sends every attempt to its providers' failover clusters (the ones with
    the retry rewrite); the provider's own default route, without retries, to the plain cluster."""
    c = compiled(CONFIG)
    assert c.table.failover_clusters == {"a.example.com": "llm_failover_a_example_com",
                                         "b.example.com": "llm_failover_b_example_com"}
    assert c.table.clusters == {"a.example.com": "llm_provider_a_example_com",
                                "b.example.com": "llm_provider_b_example_com"}
    assert c.table.cluster_hosts["llm_failover_b_example_com"] == "b.example.com"
    assert c.table.cluster_hosts["llm_provider_b_example_com"] == "b.example.com"
    headers, _ = _exchange_messages(c.table)
    assert headers["x-llm-gateway-cluster"] == "llm_failover_a_example_com"
    (plain,) = c.table.route_for("a.example.com").rules
    assert plain.failover is None and {t.cluster for t in plain.targets} == {"llm_provider_a_example_com"}


def test_first_attempt_of_a_rule_with_retries_carries_order_and_policy():
    c = compiled(CONFIG)
    headers, removed = _exchange_messages(c.table, {"x-envoy-retry-on": "reset", "x-envoy-max-retries": "9",
                                                    "x-envoy-hedge-on-per-try-timeout": "true"})
    assert headers["authorization"] == "Bearer ka" and headers[":authority"] == "a.example.com"
    assert headers["x-llm-gateway-order"] == "llm_failover_a_example_com,llm_failover_b_example_com"
    assert headers["x-envoy-max-retries"] == "1" and headers["x-envoy-retry-on"] == "5xx,retriable-status-codes"
    assert headers["x-envoy-upstream-rq-per-try-timeout-ms"] == "20000"
    assert "x-envoy-upstream-rq-timeout-ms" in removed  # provider a sets no total bound
    assert "x-envoy-hedge-on-per-try-timeout" in removed  # the client's own x-envoy-* go
    assert "x-envoy-retry-on" not in removed  # overwritten with the rule's policy


def test_rule_without_retries_sets_no_order_and_strips_client_retry_headers():
    c = compiled(CONFIG.replace("    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}\n", ""))
    headers, removed = _exchange_messages(c.table, {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "3"})
    assert not any(k.startswith(("x-llm-gateway-order", "x-llm-gateway-next", "x-envoy-retry")) for k in headers)
    assert {"x-envoy-retry-on", "x-envoy-max-retries"} <= set(removed)


def test_a_body_over_the_failover_limit_goes_in_one_attempt():
    import json as _json

    from extproc.policy.failover import FAILOVER_BODY_MAX

    c = compiled(CONFIG)
    big = _json.dumps({"messages": [{"role": "user", "content": "x" * FAILOVER_BODY_MAX}]}).encode()
    headers, _ = _exchange_messages(c.table, body=big)
    assert "x-llm-gateway-order" not in headers and "x-envoy-retry-on" not in headers
