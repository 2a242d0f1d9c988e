"""ASM's workload fields in the config: `sourceLabels`, `workloadSelector`, `matches[].gateways`,
LLMProvider's `spec.gateways`, and budgets keyed by the caller. What is refused names its field;
what is accepted compiles into what each proxy decides. (What a caller then gets:
policy/test_caller_view.py.)"""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from extproc.config.problems import ConfigError
from extproc.errors import GatewayError
from extproc.policy.budget_gate import BudgetGate
from extproc.policy.caller import Caller, labels_of
from extproc.policy.decide import match
from extproc.policy.gateway_binding import View
from support.budget_docs import budget_doc
from support.gateway_docs import EGRESS, EGRESS_ADDR, GATEWAY_VIEW, MESH_VIEW, compiled
from support.manifests import HOME, compile_in_namespaces, load_docs, provider, route, rule

DASH = "dashscope.aliyuncs.com"
P = provider("p", DASH, api_key="k")


@pytest.mark.parametrize("doc, field, message", [
    pytest.param(route("r", "chat", [{**rule(DASH), "matches": [{"sourceLabels": {"bad key": "x"}}]}]),
                 "spec.rules[0].matches[0].sourceLabels", "label key 'bad key'", id="sourceLabels-key"),
    pytest.param(route("r", "chat", [{**rule(DASH), "matches": [{"sourceLabels": {"app": "no spaces"}}]}]),
                 "spec.rules[0].matches[0].sourceLabels", "label 'app': the value 'no spaces'",
                 id="sourceLabels-value"),
    pytest.param(route("r", "chat", [rule(DASH)], workloadSelector={"labels": {"-app": "x"}}),
                 "spec.workloadSelector.labels", "label key '-app'", id="workloadSelector-key"),
    pytest.param(provider("q", "q.example.com", workloadSelector={"matchLabels": {"app": "x" * 64}}),
                 "spec.workloadSelector.matchLabels", "at most 63", id="workloadSelector-value"),
    pytest.param(route("r", "chat", [rule(DASH)], workloadSelector={"labels": {"a": "b"}, "matchLabels": {"a": "b"}}),
                 "spec.workloadSelector", "set labels or matchLabels, not both", id="workloadSelector-both"),
    pytest.param(route("r", "chat", [rule(DASH)], workloadSelector={"app": "x"}),
                 "spec.workloadSelector.app", "unknown field", id="workloadSelector-without-labels"),
    pytest.param(route("r", "chat", [{**rule(DASH), "matches": [{"gateways": ["a/b/c"]}]}]),
                 "spec.rules[0].matches[0].gateways[0]", "'a/b/c' is not 'mesh', 'name' or 'namespace/name'",
                 id="match-gateway-malformed"),
    pytest.param(provider("q", "q.example.com", gateways=["Bad_Name"]),
                 "spec.gateways[0]", "is not 'mesh'", id="provider-gateway-malformed"),
    pytest.param(provider("q", "q.example.com", gateways=["llm-gateway/egres"]),
                 "spec.gateways[0]", "no egress gateway llm-gateway/egres is known", id="provider-gateway-unknown"),
])
def test_bad_selectors_and_gateways_name_the_field(tmp_path, doc, field, message):
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, P, doc)
    (problem,) = info.value.problems
    assert problem.field == field and message in problem.message, str(problem)


def test_in_kubernetes_a_bad_label_leaves_the_object_out_with_a_condition_reason():
    """The Kubernetes source turns each problem into `Accepted=False`, its reason and field."""
    c = compile_in_namespaces(provider("q", DASH, namespace=HOME, api_key="k"),
                              provider("own", "own.example.com", namespace="shop", api_key="k",
                                       gateways=["llm-gateway/nowhere"]),
                              route("r", "chat", [rule(DASH)], namespace="shop",
                                    workloadSelector={"labels": {"app": "x"}}))
    (problem,) = c.problems
    assert (problem.obj, problem.field, problem.reason) == ("LLMProvider shop/own", "spec.gateways[0]",
                                                            "GatewayNotFound")
    assert {o.label for o in c.accepted} == {"LLMProvider llm-gateway/q", "LLMRoute shop/r"}


def test_a_provider_kept_to_a_gateway_is_never_named_by_a_route_of_the_mesh(tmp_path):
    """LLMProvider `spec.gateways` (Istio's meaning): where the provider is decided, so where its
    key may go. A route of the mesh naming a provider kept to an egress gateway is refused."""
    docs = [provider("p", DASH, api_key="k", gateways=[EGRESS]),
            route("r", "chat", [rule(DASH)])]
    c = compiled(tmp_path, docs, MESH_VIEW)
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert (problem.obj, problem.field, problem.reason) == ("LLMRoute default/r",
                                                            "spec.rules[0].backendRefs[0].providerHost",
                                                            "ProviderNotBound")
    assert "decided only at llm-gateway/egress (its spec.gateways), not at mesh" in problem.message
    # the mesh forwards the provider's own host to the gateway, and holds neither its key nor its cluster
    assert c.table.forwarded[DASH].gateway == EGRESS and c.table.forwarded[DASH].address == EGRESS_ADDR
    assert DASH not in c.table.routes and c.table.clusters == {}
    # the gateway decides it
    at_gateway = compiled(tmp_path, docs[:1], GATEWAY_VIEW)
    assert at_gateway.table.routes[DASH].rules[0].targets[0].api_key == "k"
    # a route bound to that gateway may use it
    bound = route("r", "chat", [rule(DASH)], gateways=[EGRESS])
    assert [p for p in compiled(tmp_path, [docs[0], bound], MESH_VIEW).problems if p.severity == "error"] == []
    # `mesh` listed: the sidecars decide it too
    both = compiled(tmp_path, [provider("p", DASH, api_key="k", gateways=["mesh", EGRESS]), docs[1]], MESH_VIEW)
    assert [p for p in both.problems if p.severity == "error"] == [] and DASH in both.table.routes


def test_a_match_applies_only_at_the_proxies_its_gateways_name(tmp_path):
    """`matches[].gateways` (Istio's): an entry applies at the proxies it names, else at the
    route's; a rule whose every entry applies elsewhere never matches here."""
    docs = [provider("p", DASH, api_key="k", route_configs={"gw": {"model": "at-gateway"}}),
            route("r", "chat", [{**rule(DASH, name="gw"), "matches": [{"gateways": [EGRESS]}]}, rule(DASH)],
                  gateways=["mesh", EGRESS])]
    mesh = compiled(tmp_path, docs, MESH_VIEW).table
    gateway = compiled(tmp_path, docs, GATEWAY_VIEW).table
    caller = Caller(None, "local")
    assert match(mesh, "chat", {}, caller)[1].name == "rules[1]"
    assert match(gateway, "chat", {}, caller)[1].name == "gw"
    assert [r.name for r in mesh.routes["chat"].rules] == ["rules[1]"]


def test_workload_selectors_compile_onto_the_route_in_its_namespace():
    c = compile_in_namespaces(provider("q", DASH, namespace=HOME, api_key="k", workloadSelector={"labels": {"a": "b"}}),
                              route("r", "chat", [rule(DASH)], namespace="shop",
                                    workloadSelector={"matchLabels": {"app": "payments"}}))
    assert c.problems == []
    assert (c.table.routes["chat"].namespace, c.table.routes["chat"].selector) == ("shop", labels_of(
        {"app": "payments"}))
    assert c.table.routes[DASH].selector == labels_of({"a": "b"}) and c.table.routes[DASH].provider_default


def test_the_known_limit_of_colliding_short_hosts_is_gone(tmp_path):
    """`svc` in namespace a and `svc.a` elsewhere, or `svc` in two namespaces: each resolves in the
    caller's namespace; only the same host twice in one namespace is a conflict."""
    compiled_ok = load_docs(tmp_path, P, route("r1", "svc", [rule(DASH)], namespace="a"),
                            route("r2", "svc.a", [rule(DASH)]), route("r3", "svc", [rule(DASH)], namespace="b"))
    assert compiled_ok.problems == []
    tbl = compiled_ok.table
    assert match(tbl, "svc", {}, Caller("a", "sa"))[0].name == "a/r1"
    assert match(tbl, "svc", {}, Caller("b", "sa"))[0].name == "b/r3"
    assert match(tbl, "svc.a", {}, Caller("default", "sa"))[0].name == "default/r2"  # its own short host first
    assert match(tbl, "svc.a", {}, Caller("b", "sa"))[0].name == "a/r1"  # elsewhere: the name's namespace
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, P, route("r1", "svc", [rule(DASH)], namespace="a"),
                  route("r2", "SVC", [rule(DASH)], namespace="a"))
    assert "host 'svc' is already routed by LLMRoute a/r1" in str(info.value)


@pytest.mark.parametrize("key, message", [
    ({}, "set exactly one of header or caller"),
    ({"header": "x-user", "caller": "namespace"}, "set exactly one of header or caller"),
    ({"caller": "pod"}, "Input should be 'namespace', 'serviceAccount' or 'workload'"),
])
def test_a_budget_key_is_a_header_or_the_caller(tmp_path, key, message):
    doc = budget_doc([{"tokens": 10, "per": "1h"}], host=DASH)
    doc["spec"]["key"] = key
    with pytest.raises(ConfigError) as info:
        load_docs(tmp_path, P, doc)
    (problem,) = info.value.problems
    assert problem.field.startswith("spec.key") and message in problem.message


def test_a_budget_keyed_by_namespace_caps_a_workload_whatever_headers_it_sends(tmp_path):
    doc = budget_doc([{"name": "all", "tokens": 40, "per": "1h"}], name="per-team", host=DASH, key=None)
    doc["spec"]["key"] = {"caller": "namespace"}
    table = load_docs(tmp_path, P, doc).table
    gate = BudgetGate(CollectorRegistry(), lambda: table)
    route_name = table.routes[DASH].name
    shop, other = Caller("shop", "a", "p-1", labels_of({}), "payments"), Caller("other", "a", "p-2", labels_of({}), "w")
    first = gate.admit(route_name, {"x-user-id": b"alice"}, shop)
    assert first is not None
    gate.charge(first.buckets, 400)
    for headers in ({}, {"x-user-id": b"bob"}, {"x-llm-gateway-caller": b"other"}):
        with pytest.raises(GatewayError) as refused:
            gate.admit(route_name, headers, shop)
        assert refused.value.status == 429
    assert gate.admit(route_name, {}, other) is not None  # another namespace: its own budget
    # keyed by workload: a pod whose workload is not known right now is refused, never counted elsewhere
    doc["spec"]["key"] = {"caller": "workload"}
    (tmp_path / "w").mkdir()
    by_workload = load_docs(tmp_path / "w", P, doc).table
    gate = BudgetGate(CollectorRegistry(), lambda: by_workload)
    with pytest.raises(GatewayError) as unknown:
        gate.admit(route_name, {}, Caller("shop", "a", "p-3", None, None))
    assert (unknown.value.status, unknown.value.code) == (503, "caller_unresolved")
    assert gate.admit(route_name, {}, shop).key == gate.admit(route_name, {}, Caller("shop", "b", "p-9", None,
                                                                                     "payments")).key


def test_extproc_route_names_the_callers_budget_key(tmp_path):
    from extproc.policy.budgets import describe

    doc = budget_doc([{"name": "all", "tokens": 40, "per": "1h"}], name="per-team", host=DASH, key=None)
    doc["spec"]["key"] = {"caller": "workload"}
    table = load_docs(tmp_path, P, doc).table
    (line,) = describe(table.budgets, table.routes[DASH].name, {}, Caller("shop", "a", "p", labels_of({}), "pay"))
    assert "key " in line and "= 'shop/pay' (the caller's workload)" in line


def test_no_view_can_hold_a_gateway_only_match_in_the_mesh():
    """A route bound to the mesh only, with an entry naming a gateway: a warning, and nothing of
    that entry at the sidecars."""
    c = compile_in_namespaces(provider("q", DASH, namespace=HOME, api_key="k"),
                              route("r", "chat", [{**rule(DASH), "matches": [{"gateways": [EGRESS]}]}, rule(DASH)],
                                    namespace=HOME))
    (warning,) = c.problems
    assert warning.severity == "warning" and warning.field == "spec.rules[0].matches[0].gateways[0]"
    assert [r.name for r in c.table.routes["chat"].rules] == ["rules[1]"]
    assert View().is_mesh
