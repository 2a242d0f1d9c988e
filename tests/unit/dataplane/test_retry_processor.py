"""The rewrite of a retried attempt (the failover clusters' ext_proc): the request made again for
the provider its attempt goes to, or an error, never the old provider's key sent to the next."""

from __future__ import annotations

import pytest

from support.failover_config import CONFIG, compiled


def _retry(table, order: str, attempt: int, route: str = "default/r", rule: str = "main", body: bytes | None = None,
           asked: dict | None = None):
    import json as _json

    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.retry_processor import RetryExchange

    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key="x-llm-gateway-order", raw_value=order.encode()),
        base_pb2.HeaderValue(key="x-envoy-attempt-count", raw_value=str(attempt).encode()),
        base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer ka")])))
    headers.metadata_context.filter_metadata["llm_gateway"].update({"route": route, "rule": rule, **(asked or {})})
    exchange = RetryExchange(table)
    first, done = exchange.on_request(headers)
    if done:
        return first, None
    raw = body or _json.dumps({"model": "ma", "messages": [{"role": "user", "content": "hi"}]}).encode()
    second, done = exchange.on_request(pb.ProcessingRequest(request_body=pb.HttpBody(body=raw, end_of_stream=True)))
    assert done
    return first, second


def test_retried_attempt_is_rewritten_for_its_provider():
    import json as _json

    table = compiled(CONFIG).table
    (head,), (body,) = _retry(table, "llm_failover_a_example_com,llm_failover_b_example_com", 2)
    values = {o.header.key: o.header.raw_value.decode()
              for o in head.request_headers.response.header_mutation.set_headers}
    assert values == {":path": "/v1/chat/completions", ":authority": "b.example.com", "authorization": "Bearer kb"}
    common = body.request_body.response
    assert _json.loads(common.body_mutation.body)["model"] == "mb-main"
    meta = body.dynamic_metadata.fields["llm_gateway"].struct_value.fields
    assert meta["provider"].string_value == "default/b" and meta["tried"].string_value == "a.example.com"


@pytest.mark.parametrize("order, attempt, route, code", [
    ("llm_failover_a_example_com", 2, "default/r", "retry_error"),  # beyond the order
    ("llm_failover_a_example_com,llm_failover_b_example_com", 1, "default/r", "retry_error"),
    ("llm_failover_a_example_com,llm_failover_b_example_com", 2, "default/gone", "retry_provider_gone"),
])
def test_retry_that_cannot_be_prepared_is_an_error_not_a_request_with_the_old_key(order, attempt, route, code):
    import json as _json

    (answer,), _ = _retry(compiled(CONFIG).table, order, attempt, route=route)
    assert answer.WhichOneof("response") == "immediate_response"
    assert _json.loads(answer.immediate_response.body)["error"]["code"] == code


@pytest.mark.parametrize(("asked", "previous", "sent"), [
    pytest.param(None, True, True, id="no-ask-keeps-the-previous-bodys"),
    pytest.param({"client_stream": True}, False, True, id="the-clients-stream-back"),
    pytest.param({"client_stream": False}, True, False, id="the-clients-json-back"),
])
def test_a_retry_asks_its_provider_for_the_clients_format(asked, previous, sent):
    """The previous attempt's body holds its provider's `stream`; where the request's decision
    carries the client's own (its answer is processed), a provider without a `stream` setting
    is asked for that."""
    import json as _json

    body = _json.dumps({"model": "ma", "messages": [{"role": "user", "content": "hi"}], "stream": previous}).encode()
    _, (answer,) = _retry(compiled(CONFIG).table, "llm_failover_a_example_com,llm_failover_b_example_com", 2,
                          body=body, asked=asked)
    rewritten = _json.loads(answer.request_body.response.body_mutation.body)
    assert rewritten["stream"] is sent
    assert ("stream_options" in rewritten) is sent
    assert answer.dynamic_metadata.fields["llm_gateway"].struct_value.fields["stream"].bool_value is sent


PRICES = """
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: a-prices}
spec:
  host: a.example.com
  currency: USD
  models: [{model: ma, input: "1", output: "2"}]
---
apiVersion: llm-gateway.dev/v1alpha1
kind: LLMPriceTable
metadata: {name: b-prices}
spec:
  host: b.example.com
  currency: USD
  models: [{model: mb, input: "1", output: "2"}]
"""


@pytest.mark.parametrize("cap, refused", [("USD", True), (None, False)])
def test_a_retry_a_cost_cap_could_not_charge_is_refused_not_sent(cap, refused):
    """b's rule sends `mb-main`, which b's table does not price: under a cost cap (the request's
    `budget_currency`), the retry is refused (403 model_not_priced) rather than sent uncharged;
    without one it goes as ever, unpriced."""
    import json as _json

    table = compiled(CONFIG + PRICES).table
    asked = {"budget": "default/spend", "budget_currency": cap, "currency": "USD"} if cap else {"currency": "USD"}
    _, (answer,) = _retry(table, "llm_failover_a_example_com,llm_failover_b_example_com", 2, asked=asked)
    if refused:
        assert answer.immediate_response.status.code == 403
        error = _json.loads(answer.immediate_response.body)["error"]
        assert error["code"] == "model_not_priced" and "mb-main" in error["message"] and "default/spend" in \
            error["message"]
    else:
        assert answer.WhichOneof("response") == "request_body"
        assert "currency" not in answer.dynamic_metadata.fields["llm_gateway"].struct_value.fields or \
            answer.dynamic_metadata.fields["llm_gateway"].struct_value.fields["currency"].string_value == ""
