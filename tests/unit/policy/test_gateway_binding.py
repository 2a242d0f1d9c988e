"""`LLMRoute.spec.gateways`: which proxy decides which host (the mesh's sidecars or an egress
gateway), what the sidecars forward, and what neither may hold. Table tests of the decisions,
through the real loader and compiler. (The sidecars' ext_proc: dataplane/test_processor.py; their
routes and clusters: envoy/test_routes.py, envoy/test_clusters.py.)"""

from __future__ import annotations

import pytest

from extproc.config.compile import compile_config
from extproc.config.file_source import load_config
from extproc.config.loader import load_paths
from extproc.config.problems import ConfigError
from extproc.policy.gateway_binding import (
    MESH,
    View,
    default_address,
    gateway_ref,
    parse_gateway_name,
    provider_binding,
)
from support.gateway_docs import (
    EGRESS,
    GATEWAY_VIEW,
    KEY_A,
    KEY_B,
    MESH_VIEW,
    OTHER,
    OTHER_VIEW,
    A,
    B,
    compiled,
    providers,
)
from support.manifests import route, rule, write


@pytest.mark.parametrize(("entry", "namespace", "expected"), [
    ("mesh", "default", MESH),
    ("egress", "team", "team/egress"),
    ("llm-gateway/egress", "team", "llm-gateway/egress"),
    ("Egress", "team", ValueError),  # Kubernetes names are lower case
    ("a/b/c", "team", ValueError),
    ("/egress", "team", ValueError),
    ("egress/", "team", ValueError),
    ("under_score", "team", ValueError),
])
def test_gateway_ref(entry, namespace, expected):
    if expected is ValueError:
        with pytest.raises(ValueError, match="not 'mesh', 'name' or 'namespace/name'"):
            gateway_ref(entry, namespace)
    else:
        assert gateway_ref(entry, namespace) == expected


def test_command_line_names_and_default_address():
    assert parse_gateway_name("llm-gateway/egress") == "llm-gateway/egress"
    for bad in ("egress", "a/b/c", "A/b", "a/"):
        with pytest.raises(ValueError):
            parse_gateway_name(bad)
    assert default_address("llm-gateway/egress") == "egress.llm-gateway.svc.cluster.local:80"
    assert provider_binding([]) == (MESH,)
    assert provider_binding([(OTHER, EGRESS), (MESH, OTHER)]) == (OTHER, EGRESS, MESH)
    assert provider_binding([()]) == ()  # named only by a route whose entries are all malformed: nowhere


# (docs, view, hosts decided here, hosts forwarded to which gateway, provider clusters here)
CASES = [
    pytest.param([route("r", "chat", [rule(A)])], MESH_VIEW,
                 {"chat", A, B}, {}, {A, B}, id="no-gateways-is-the-mesh"),
    pytest.param([route("r", "chat", [rule(A)], gateways=["mesh"])], MESH_VIEW,
                 {"chat", A, B}, {}, {A, B}, id="mesh-named"),
    pytest.param([route("r", "chat", [rule(A)], gateways=[])], MESH_VIEW,
                 {"chat", A, B}, {}, {A, B}, id="empty-list-is-the-mesh"),
    pytest.param([route("r", "chat", [rule(A)], gateways=["mesh"])], GATEWAY_VIEW,
                 set(), {}, set(), id="mesh-route-not-on-a-gateway"),
    # bound to the gateway only: the sidecars forward the route's host AND the provider it alone uses
    pytest.param([route("r", "chat", [rule(A)], gateways=[EGRESS])], MESH_VIEW,
                 {B}, {"chat": EGRESS, A: EGRESS}, {B}, id="gateway-only-mesh-view"),
    pytest.param([route("r", "chat", [rule(A)], gateways=[EGRESS])], GATEWAY_VIEW,
                 {"chat", A}, {}, {A}, id="gateway-only-gateway-view"),
    pytest.param([route("r", "chat", [rule(A)], gateways=[EGRESS])], OTHER_VIEW,
                 set(), {}, set(), id="gateway-only-another-gateway"),
    # a short name is the route's own namespace
    pytest.param([route("r", "chat", [rule(A)], namespace="llm-gateway", gateways=["egress"])], GATEWAY_VIEW,
                 {"chat", A}, {}, {A}, id="short-name-in-route-namespace"),
    # both: each decides for itself
    pytest.param([route("r", "chat", [rule(A)], gateways=["mesh", EGRESS])], MESH_VIEW,
                 {"chat", A, B}, {}, {A, B}, id="mesh-and-gateway-mesh-view"),
    pytest.param([route("r", "chat", [rule(A)], gateways=["mesh", EGRESS])], GATEWAY_VIEW,
                 {"chat", A}, {}, {A}, id="mesh-and-gateway-gateway-view"),
    # a provider named by a mesh route and a gateway route is decided in both places
    pytest.param([route("r1", "chat", [rule(A)], gateways=[EGRESS]), route("r2", "talk", [rule(A)])], MESH_VIEW,
                 {"talk", A, B}, {"chat": EGRESS}, {A, B}, id="provider-shared-mesh-view"),
    pytest.param([route("r1", "chat", [rule(A)], gateways=[EGRESS]), route("r2", "talk", [rule(A)])], GATEWAY_VIEW,
                 {"chat", A}, {}, {A}, id="provider-shared-gateway-view"),
    # an LLMRoute on a provider's own host, bound to the gateway: the host goes to the gateway
    pytest.param([route("r", A, [rule(B)], gateways=[EGRESS])], MESH_VIEW,
                 set(), {A: EGRESS, B: EGRESS}, set(), id="route-on-provider-host-mesh-view"),
    # two gateways: the sidecars use the first one listed
    pytest.param([route("r", "chat", [rule(A)], gateways=[OTHER, EGRESS])], MESH_VIEW,
                 {B}, {"chat": OTHER, A: OTHER}, {B}, id="first-listed-gateway"),
    # the same host on disjoint bindings: the mesh decides its own, the gateway its own
    pytest.param([route("r1", "chat", [rule(A)]), route("r2", "chat", [rule(B)], gateways=[EGRESS])], MESH_VIEW,
                 {"chat", A}, {B: EGRESS}, {A}, id="same-host-disjoint-mesh-view"),
    pytest.param([route("r1", "chat", [rule(A)]), route("r2", "chat", [rule(B)], gateways=[EGRESS])], GATEWAY_VIEW,
                 {"chat", B}, {}, {B}, id="same-host-disjoint-gateway-view"),
]


@pytest.mark.parametrize(("routes", "view", "decided", "forwarded", "clusters"), CASES)
def test_who_decides_which_host(tmp_path, routes, view, decided, forwarded, clusters):
    result = compiled(tmp_path, providers() + routes, view)
    assert [p for p in result.problems if p.severity == "error"] == []
    table = result.table
    exact = {h for h in table.routes if "." not in h or h in (A, B)}  # leave the namespace aliases out
    assert exact == decided
    assert {h: f.gateway for h, f in table.forwarded.items() if "." not in h or h in (A, B)} == forwarded
    assert set(table.clusters) == clusters
    assert not set(table.routes) & set(table.forwarded)
    # every alias goes where its host goes
    for host, gateway in forwarded.items():
        if "." not in host:
            assert table.forwarded[f"{host}.default.svc.cluster.local"].gateway == gateway
    # the keys of providers this proxy does not decide for are in none of its targets
    keys = {t.api_key for r in table.routes.values() for rule_ in r.rules for t in rule_.targets}
    assert keys == {KEY_A if h == A else KEY_B for h in clusters}


def test_a_provider_named_only_by_a_rejected_gateway_route_stays_out_of_the_mesh(tmp_path):
    """A gateway-bound route that fails (here: a second providerHost nobody serves) does not hand
    its provider's key to the sidecars: the provider's own host still follows the route's binding."""
    docs = providers() + [route("r", "chat", [rule(A), rule("nope.example.com")], gateways=[EGRESS])]
    result = compiled(tmp_path, docs, MESH_VIEW)
    assert [p.field for p in result.problems] == ["spec.rules[1].backendRefs[0].providerHost"]
    assert A not in result.table.routes and result.table.forwarded[A].gateway == EGRESS


@pytest.mark.parametrize(("gateways", "view", "field", "message", "reason"), [
    pytest.param(["egres"], MESH_VIEW, "spec.gateways[0]", "no egress gateway default/egres is known (known: "
                 "llm-gateway/egress, llm-gateway/other; declare one with --egress-gateway)", "GatewayNotFound",
                 id="unknown-in-mesh-view"),
    pytest.param(["mesh", "llm-gateway/nope"], MESH_VIEW, "spec.gateways[1]", "no egress gateway llm-gateway/nope",
                 "GatewayNotFound", id="unknown-second-entry"),
    pytest.param([EGRESS], View(), "spec.gateways[0]", "(known: none;", "GatewayNotFound", id="none-declared"),
    pytest.param(["a/b/c"], GATEWAY_VIEW, "spec.gateways[0]", "is not 'mesh', 'name' or 'namespace/name'",
                 "InvalidSpec", id="malformed-on-a-gateway"),
    pytest.param(["Egress"], MESH_VIEW, "spec.gateways[0]", "lower-case DNS labels", "InvalidSpec", id="upper-case"),
])
def test_bad_gateways_entries_name_file_object_field(tmp_path, gateways, view, field, message, reason):
    file = write(tmp_path / "routes.yaml", *providers(), route("r", "chat", [rule(A)], gateways=gateways))
    objects, _ = load_paths([file], {})
    result = compile_config(objects, view)
    (problem,) = [p for p in result.problems if p.severity == "error"]
    assert ((problem.file, problem.obj, problem.field, problem.reason)
            == (str(file), "LLMRoute default/r", field, reason))
    assert message in problem.message
    assert "chat" not in result.table.routes and "chat" not in result.table.forwarded
    with pytest.raises(ConfigError) as info:  # files: the whole config is refused, naming the place
        load_config([file], {}, view)
    assert f"LLMRoute default/r: {field}: " in str(info.value)


def test_a_gateway_does_not_check_the_names_of_other_gateways(tmp_path):
    """Only the control plane places gateways; a gateway serves what names it, whatever else is named."""
    result = compiled(tmp_path, providers() + [route("r", "chat", [rule(A)], gateways=[EGRESS, "elsewhere/gw"])],
                      GATEWAY_VIEW)
    assert [p for p in result.problems if p.severity == "error"] == [] and "chat" in result.table.routes


@pytest.mark.parametrize(("r1", "r2", "conflict"), [
    pytest.param({}, {}, True, id="both-mesh"),
    pytest.param({"gateways": [EGRESS]}, {"gateways": [EGRESS]}, True, id="both-gateway"),
    pytest.param({"gateways": ["mesh", EGRESS]}, {"gateways": [EGRESS]}, True, id="overlap"),
    pytest.param({}, {"gateways": [EGRESS]}, False, id="mesh-and-gateway"),
    pytest.param({"gateways": [OTHER]}, {"gateways": [EGRESS]}, False, id="two-gateways"),
])
def test_a_host_is_held_once_per_proxy(tmp_path, r1, r2, conflict):
    docs = providers() + [route("r1", "chat", [rule(A)], **r1), route("r2", "chat", [rule(B)], **r2)]
    for view in (MESH_VIEW, GATEWAY_VIEW):  # the verdict is the same in every view
        result = compiled(tmp_path, docs, view)
        found = [(p.obj, p.field, p.reason) for p in result.problems if p.severity == "error"]
        assert found == ([("LLMRoute default/r2", "spec.host", "HostConflict")] if conflict else [])


def test_a_budget_on_a_gateways_host_is_accepted_by_the_mesh_and_applied_at_the_gateway(tmp_path):
    """The control plane writes the conditions: it accepts a budget whose host an egress gateway
    decides (issue 33), and only the gateway limits it."""
    from support.budget_docs import budget_doc

    docs = providers() + [route("r", "chat", [rule(A)], gateways=[EGRESS]),
                          budget_doc([{"name": "each", "tokens": 40, "per": "1h"}], host="chat", key=None)]
    mesh = compiled(tmp_path, docs, MESH_VIEW)
    assert [p for p in mesh.problems if p.severity == "error"] == []
    assert any(o.resource.kind == "LLMTokenRateLimit" for o in mesh.accepted)
    assert not mesh.table.budgets.by_route  # nothing to limit at the sidecars
    gateway = compiled(tmp_path, docs, GATEWAY_VIEW)
    assert list(gateway.table.budgets.by_route) == ["default/r"]
    # a host nobody serves is still the object's error
    nowhere = compiled(tmp_path, providers() + [budget_doc([{"name": "each", "tokens": 40, "per": "1h"}],
                                                           host="nobody", key=None)], MESH_VIEW)
    assert [p.reason for p in nowhere.problems] == ["HostNotFound"]
