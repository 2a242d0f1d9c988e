"""Compiling the config for namespaces: each route carries the namespaces that may use it, and a
route may not reach a provider that is not exported to its namespace."""

from __future__ import annotations

from support.manifests import HOME, compile_in_namespaces, provider, route, rule


def test_compiled_routes_carry_their_namespace_views():
    c = compile_in_namespaces(provider("shared", "shared.example", namespace=HOME, api_key="k1"),
                              provider("a", "a.example", namespace="team-a", api_key="k2"),
                              provider("b", "b.example", namespace="team-b", api_key="k3", exportTo=["team-a"]),
                              route("ra", "chat-a", [rule("shared.example", "a.example", "b.example")],
                                    namespace="team-a"),
                              route("open", "chat-open", [rule("shared.example")], namespace="team-c", exportTo=["*"]))
    assert not [p for p in c.problems if p.severity == "error"], c.problems
    views = {host: c.table.routes[host].visible for host in
             ("shared.example", "a.example", "b.example", "chat-a.team-a", "chat-open")}
    assert views == {"shared.example": None, "a.example": frozenset({"team-a"}), "b.example": frozenset({"team-a"}),
                     "chat-a.team-a": frozenset({"team-a"}), "chat-open": None}


def test_a_route_may_not_use_a_provider_not_exported_to_its_namespace():
    c = compile_in_namespaces(provider("a", "a.example", namespace="team-a", api_key="k"),
                              route("steal", "chat", [rule("a.example")], namespace="team-b"))
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert problem.reason == "ProviderNotExported" and problem.obj == "LLMRoute team-b/steal"
    assert problem.field == "spec.rules[0].backendRefs[0].providerHost" and "team-a/a" in problem.message
    assert c.table.route_for("chat") is None
    # files (no namespaces): the operator wrote both, so it is allowed
    assert compile_in_namespaces(provider("a", "a.example", namespace="team-a", api_key="k"),
                                 route("steal", "chat", [rule("a.example")], namespace="team-b"),
                                 namespaces=False).table.route_for("chat").visible is None


def test_a_fallback_may_not_reach_a_provider_not_exported_to_the_routes_namespace():
    """A fallbackRef is a way to a provider's key like a backendRef: the same export check."""
    own = {**rule("own.example"), "fallbackRefs": [{"providerHost": "a.example"}], "retries": {"attempts": 1}}
    c = compile_in_namespaces(provider("a", "a.example", namespace="team-a", api_key="k"),
                              provider("own", "own.example", namespace="team-b", api_key="k2"),
                              route("steal", "chat", [own], namespace="team-b"))
    (problem,) = [p for p in c.problems if p.severity == "error"]
    assert problem.reason == "ProviderNotExported" and problem.field == "spec.rules[0].fallbackRefs[0].providerHost"
    assert c.table.route_for("chat") is None
