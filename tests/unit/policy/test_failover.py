"""Table tests of failover's pure decisions: attempt order, retry headers, passive health, the
per-attempt rewrite's target lookup, and the config checks of the new fields."""

from __future__ import annotations

import pytest

from extproc.config.compile import compile_config
from extproc.config.loader import load_text
from extproc.errors import GatewayError
from extproc.policy.failover import attempt_order, build_failover, full_order
from extproc.policy.passive_health import PassiveHealth
from extproc.policy.table import RetryPolicy
from extproc.envoy.failover import add_raw_fields, failover_route, with_raw_fields
from extproc.policy.failover import order_headers, retry_target
from extproc.policy.table import Target


def t(host: str) -> Target:
    return Target("r", "rule", f"ns/{host}", host, f"c_{host}", "/v1", f"m-{host}", None, f"key-{host}")


A, B, C, D = (t(h) for h in "abcd")


@pytest.mark.parametrize("picked, weights, fallbacks, expected", [
    (0, (50, 50), (C,), "abc"),
    (1, (50, 50), (C,), "bac"),
    (0, (10, 0, 30), (), "acb"),      # others by weight, highest first; weight 0 last
    (1, (10, 0, 30), (), "bca"),
    (0, (50, 50), (B, C), "abc"),     # a provider named twice is tried once, where it comes first
    (0, (1,), (D, C), "adc"),         # fallbacks in written order
])
def test_full_order(picked, weights, fallbacks, expected):
    targets = (A, B, C)[: len(weights)]
    order = full_order(picked, targets, weights, fallbacks)
    assert "".join(x.provider_host for x in order) == expected


@pytest.mark.parametrize("attempts, cooling, expected", [
    (2, set(), "abc"),
    (1, set(), "ab"),
    (0, set(), "a"),
    (5, set(), "abc"),                # never longer than the providers there are
    (2, {"a"}, "bc"),                 # the pick is cooling: the next provider goes first
    (1, {"b"}, "ac"),
    (2, {"a", "b", "c"}, "a"),        # all cooling: the pick alone, tried anyway
])
def test_attempt_order(attempts, cooling, expected):
    failover = build_failover((A, B), (50, 50), (C,), RetryPolicy.from_config(attempts, None, ["5xx"]))
    assert "".join(x.provider_host for x in attempt_order(failover, 0, cooling)) == expected


@pytest.mark.parametrize("retry_on, per_try, expected", [
    (["connect-failure", "reset", "5xx", "429"], 20.0,
     {"x-envoy-max-retries": "2", "x-envoy-retry-on": "connect-failure,reset,5xx,retriable-status-codes",
      "x-envoy-retriable-status-codes": "429", "x-envoy-upstream-rq-per-try-timeout-ms": "20000"}),
    (["5xx"], None, {"x-envoy-max-retries": "2", "x-envoy-retry-on": "5xx"}),
    (["503", "429"], 1.5, {"x-envoy-max-retries": "2", "x-envoy-retry-on": "retriable-status-codes",
                           "x-envoy-retriable-status-codes": "429,503", "x-envoy-upstream-rq-per-try-timeout-ms": "1500"}),
])
def test_retry_headers(retry_on, per_try, expected):
    assert dict(RetryPolicy.from_config(2, per_try, retry_on).envoy_headers()) == expected


def test_order_headers_name_each_next_cluster():
    headers = dict(order_headers((A, B, C), RetryPolicy.from_config(2, None, ["5xx"])))
    assert headers["x-llm-gateway-order"] == "c_a,c_b,c_c"
    assert headers["x-llm-gateway-next-c_a"] == "c_b" and headers["x-llm-gateway-next-c_b"] == "c_c"
    assert headers["x-llm-gateway-next-c_c"] == "llm_gateway_no_provider"
    assert not any("key-" in v for v in headers.values())  # no key in a header Envoy routes on


def test_passive_health_cools_down_after_consecutive_failures_and_recovers():
    h = PassiveHealth({"a": (3, 10.0)})
    assert not h.failed("a", 0) and not h.failed("a", 1)
    h.succeeded("a")  # a success in between: the count starts again
    assert not h.failed("a", 2) and not h.failed("a", 3)
    assert h.failed("a", 4)  # third in a row
    assert "a" in h.cooling(5) and h.gauge(5) == {"a": True}
    assert h.cooling(14.5) == {}  # the period is over: tried again
    assert h.failed("a", 15)  # one more failure cools it down again
    assert "a" in h.cooling(16)
    h.succeeded("a")
    assert h.cooling(17) == {} and h.gauge(17) == {"a": False}


def test_unknown_provider_uses_the_default_thresholds():
    h = PassiveHealth()
    assert [h.failed("x", 0) for _ in range(3)] == [False, False, True]


CONFIG = """
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: a}
spec:
  host: a.example.com
  outlierDetection: {consecutiveErrors: 5, baseEjectionTime: 1m}
  configs:
    defaultConfig: {openAIConfig: {model: ma, apiKey: ka}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMProvider
metadata: {name: b}
spec:
  host: b.example.com
  timeout: 10s
  configs:
    defaultConfig: {openAIConfig: {model: mb, apiKey: kb}}
    routeSpecificConfigs:
      main: {openAIConfig: {model: mb-main}}
---
apiVersion: istio.alibabacloud.com/v1beta1
kind: LLMRoute
metadata: {name: r}
spec:
  host: svc
  rules:
  - name: main
    backendRefs: [{providerHost: a.example.com}]
    fallbackRefs: [{providerHost: b.example.com}]
    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}
"""


def compiled(text: str):
    loaded, problems = load_text(text, "f.yaml")
    assert not problems, problems
    return compile_config(loaded)


def test_config_compiles_to_orders_policy_and_thresholds():
    c = compiled(CONFIG)
    assert not [p for p in c.problems if p.severity == "error"]
    rule = c.table.route_for("svc").rules[0]
    assert rule.failover.policy == RetryPolicy(1, 20.0, ("5xx",), (429,))
    (order,) = rule.failover.orders
    assert [x.model for x in order] == ["ma", "mb-main"]  # the rule's routeSpecificConfig for b
    assert order[0].timeout_s is None and order[1].timeout_s == 10.0  # a total bound only where set
    assert c.table.health == {"a.example.com": (5, 60.0), "b.example.com": (3, 30.0)}
    # the retry of attempt 2 is rewritten for b, with the rule's own config for b
    target = retry_target(c.table, "default/r", "main", "llm_failover_a_example_com,llm_failover_b_example_com", 2)
    assert target.provider_host == "b.example.com" and target.model == "mb-main" and target.api_key == "kb"
    with pytest.raises(GatewayError):
        retry_target(c.table, "default/r", "main", "llm_failover_a_example_com", 2)  # beyond the order


def test_rule_without_retries_has_no_failover():
    c = compiled(CONFIG.replace("    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}\n", ""))
    assert c.table.route_for("svc").rules[0].failover is None


@pytest.mark.parametrize("change, field, message", [
    ("attempts: 1", "attempts: -1", "greater than or equal to 0"),
    ("perTryTimeout: 20s", "perTryTimeout: soon", "should match pattern"),
    ("retryOn: [5xx, 429]", "retryOn: [5xx, teapot]", "unknown retryOn value 'teapot'"),
    ("retryOn: [5xx, 429]", "retryOn: [5xx, 200]", "unknown retryOn value '200'"),
])
def test_bad_retries_name_the_field(change, field, message):
    loaded, problems = load_text(CONFIG.replace(change, field), "f.yaml")
    text = "\n".join(str(p) for p in problems)
    assert "f.yaml" in text and "LLMRoute default/r" in text and "spec.rules[0].retries" in text, text
    assert message in text, text


def test_fallback_no_provider_serves_names_the_field():
    c = compiled(CONFIG.replace("fallbackRefs: [{providerHost: b.example.com}]", "fallbackRefs: [{providerHost: z.example.com}]"))
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert problem.field == "spec.rules[0].fallbackRefs[0].providerHost" and "z.example.com" in problem.message


def test_route_proto_carries_the_fields_our_protobuf_package_lacks():
    from extproc.envoy.routes import any_host_route_configuration, to_route_proto

    message = to_route_proto(any_host_route_configuration(["c1", "c2"]))
    action = message.virtual_hosts[0].routes[0].route
    assert action.inline_cluster_specifier_plugin.extension.name == "envoy.router.cluster_specifier_plugin.matcher"
    assert b"c1" in action.inline_cluster_specifier_plugin.extension.typed_config.value
    assert bytes([14 << 3, 1]) in action.retry_policy.SerializeToString()  # refresh_cluster_on_retry
    assert message.virtual_hosts[0].routes[1].route.cluster_header  # rules without retries: as before
    clean, where = with_raw_fields({"virtual_hosts": [{"routes": [failover_route(["x"], 1 << 20)]}]})
    assert where == [(0, 0, ["x"])] and "inline_cluster_specifier_plugin" not in clean["virtual_hosts"][0]["routes"][0]["route"]
    assert add_raw_fields  # used by to_route_proto above


# The ext_proc: the first attempt's answer, and a retried attempt's rewrite.

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


def test_cooling_provider_is_left_out_of_the_first_attempt():
    from extproc.policy.failover import first_attempt

    rule = compiled(CONFIG).table.route_for("svc").rules[0]
    target, headers = first_attempt(rule.failover, 0, {"a.example.com": 99.0})
    assert target.provider_host == "b.example.com"
    values = dict(headers)
    assert values["x-llm-gateway-order"] == "llm_failover_b_example_com"
    assert first_attempt(rule.failover, 0, {})[0].provider_host == "a.example.com"


def _retry(table, order: str, attempt: int, route: str = "default/r", rule: str = "main", body: bytes | None = None):
    import json as _json

    from envoy.config.core.v3 import base_pb2
    from envoy.service.ext_proc.v3 import external_processor_pb2 as pb

    from extproc.dataplane.retry_processor import RetryExchange

    headers = pb.ProcessingRequest(request_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key="x-llm-gateway-order", raw_value=order.encode()),
        base_pb2.HeaderValue(key="x-envoy-attempt-count", raw_value=str(attempt).encode()),
        base_pb2.HeaderValue(key="authorization", raw_value=b"Bearer ka")])))
    headers.metadata_context.filter_metadata["llm_gateway"].update({"route": route, "rule": rule})
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
    values = {o.header.key: o.header.raw_value.decode() for o in head.request_headers.response.header_mutation.set_headers}
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


def test_dry_run_describes_policy_and_orders():
    from extproc.policy.failover import describe_failover

    rule = compiled(CONFIG).table.route_for("svc").rules[0]
    text = describe_failover(rule)
    assert "attempts=1 perTryTimeout=20s retryOn=5xx,429" in text
    assert "when a.example.com is picked: a.example.com -> b.example.com" in text
    plain = compiled(CONFIG.replace("    retries: {attempts: 1, perTryTimeout: 20s, retryOn: [5xx, 429]}\n", ""))
    assert describe_failover(plain.table.route_for("svc").rules[0]).startswith("retries: none")


def test_crds_carry_the_new_fields():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[3] / "k8s" / "crds.yaml").read_text()
    for name in ("fallbackRefs", "retries", "perTryTimeout", "retryOn", "outlierDetection", "consecutiveErrors",
                 "baseEjectionTime"):
        assert f"{name}:" in text, name


def _entry(cluster: str, status: int, attempt: int = 1, request_id: str = "r1", upstream: bool = False, **flags):
    from envoy.data.accesslog.v3 import accesslog_pb2

    entry = accesslog_pb2.HTTPAccessLogEntry()
    common = entry.common_properties
    common.upstream_cluster = cluster
    common.upstream_request_attempt_count = attempt
    common.access_log_type = accesslog_pb2.AccessLogType.Value("UpstreamEnd" if upstream else "DownstreamEnd")
    for name, value in flags.items():
        if name == "failure":
            common.upstream_transport_failure_reason = value
        else:
            setattr(common.response_flags, name, value)
    if status:
        entry.response.response_code.value = status
    entry.request.request_id = request_id
    return entry


@pytest.mark.parametrize("status, flags, reason", [
    (503, {}, "503"),
    (429, {}, "429"),
    (0, {"upstream_connection_failure": True}, "connect_failure"),
    (0, {"upstream_connection_failure": True, "failure": "TLS_error:|268435581:SSL routines:CERTIFICATE_VERIFY_FAILED"}, "tls"),
    (0, {"upstream_request_timeout": True}, "timeout"),
    (0, {"upstream_remote_reset": True}, "reset"),
    (0, {}, "no_answer"),
])
def test_attempt_reason(status, flags, reason):
    from extproc.policy.passive_health import attempt_reason

    assert attempt_reason(_entry("c", status, upstream=True, **flags)) == reason


def test_observer_counts_failovers_and_feeds_passive_health():
    from prometheus_client import CollectorRegistry

    from extproc.policy.passive_health import AttemptObserver

    registry = CollectorRegistry()
    health = PassiveHealth({"a.example.com": (2, 30.0)})
    observer = AttemptObserver(health, registry, clock=lambda: 100.0,
                                hosts=lambda: {"llm_provider_a_example_com": "a.example.com",
                                               "llm_provider_b_example_com": "b.example.com"})
    # request r1: A fails (503), B answers
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r1", upstream=True))
    observer.observe(_entry("llm_provider_b_example_com", 200, 2, "r1"))
    # request r2: A fails again and nothing else was tried
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r2", upstream=True))
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r2"))
    value = lambda name, **labels: registry.get_sample_value(name, labels)  # noqa: E731
    assert value("llm_gateway_failovers_total", provider="a.example.com", reason="503") == 1
    assert value("llm_gateway_provider_attempts_total", provider="a.example.com", result="503") == 2
    assert value("llm_gateway_provider_attempts_total", provider="b.example.com", result="ok") == 1
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 1  # two in a row
    # an answer from A (a 4xx is the client's fault) clears it
    observer.observe(_entry("llm_provider_a_example_com", 400, 1, "r3"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 0


def test_a_request_without_an_attempt_order_is_its_own_attempt():
    """Envoy logs attempts apart only for requests with an attempt order; a request of a rule
    without `retries` made one attempt, read from the request's own entry. A client that left
    (no status) says nothing about the provider."""
    from prometheus_client import CollectorRegistry

    from extproc.policy.passive_health import AttemptObserver

    registry = CollectorRegistry()
    health = PassiveHealth({"a.example.com": (2, 30.0)})
    observer = AttemptObserver(health, registry, clock=lambda: 100.0,
                                hosts=lambda: {"llm_provider_a_example_com": "a.example.com"})
    value = lambda name, **labels: registry.get_sample_value(name, labels)  # noqa: E731
    observer.observe(_entry("llm_provider_a_example_com", 0, 1, "r0"))  # the client left
    observer.observe(_entry("llm_provider_a_example_com", 503, 1, "r1"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 0
    observer.observe(_entry("llm_provider_a_example_com", 0, 1, "r2", upstream_connection_failure=True))
    assert value("llm_gateway_provider_attempts_total", provider="a.example.com", result="503") == 1
    assert value("llm_gateway_provider_attempts_total", provider="a.example.com", result="no_answer") is None
    assert value("llm_gateway_failovers_total", provider="a.example.com", reason="503") is None  # nothing failed over
    observer.observe(_entry("llm_provider_a_example_com", 502, 1, "r3"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 1  # two in a row
    observer.observe(_entry("llm_provider_a_example_com", 200, 1, "r4"))
    assert value("llm_gateway_provider_cooling_down", provider="a.example.com") == 0
