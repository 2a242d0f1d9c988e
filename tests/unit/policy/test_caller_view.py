"""What one caller sees of the routing table (extproc.policy.caller_view), through the one decision
function: `sourceLabels`, `workloadSelector`, short hosts resolved in the caller's namespace, and
a caller whose labels are not known never getting another caller's routes."""

from __future__ import annotations

import pytest

from extproc.errors import GatewayError
from extproc.policy.caller import LOCAL, Caller, labels_of, local_caller
from extproc.policy.caller_view import view_of
from extproc.policy.decide import Decision, decide, match
from support.manifests import HOME, compile_in_namespaces, load_docs, provider, route, rule

DASH = "dashscope.aliyuncs.com"


def payments_rule() -> dict:
    return {**rule(DASH, name="payments"), "matches": [{"sourceLabels": {"app": "payments"}}]}


def table():
    """The platform team's config: payments workloads get qwen-max, everyone else qwen-turbo; a
    short host in two namespaces; a route only the payments proxies see."""
    return compile_in_namespaces(
        provider("qwen", DASH, "qwen-turbo", namespace=HOME, api_key="sk-shared",
                 route_configs={"payments": {"model": "qwen-max"}, "vip": {"model": "qwen-plus"}}),
        route("dash", DASH, [payments_rule(),
                             {**rule(DASH, name="vip"), "matches": [{"headers": {"user-type": {"exact": "vip"}},
                                                                     "sourceLabels": {"tier": "gold"}}]},
                             rule(DASH)], namespace="shop"),
        route("chat", "chat", [rule(DASH)], namespace="team-a"),
        route("chat", "chat", [rule(DASH)], namespace="team-b"),
        route("audit", "audit", [rule(DASH)], namespace="shop", workloadSelector={"labels": {"app": "payments"}}),
    ).table


def caller(namespace: str = "shop", labels: dict | None = None, known: bool = True) -> Caller:
    return Caller(namespace, "default", "pod-1", labels_of(labels or {}) if known else None,
                  "w" if known else None)


def ask(tbl, who: Caller, host: str, headers: dict[str, str] | None = None) -> tuple[str, str, str | None] | str:
    """(route, rule, model) the one decision function gives, or `status code` of its refusal."""
    raw = {":authority": host.encode(), ":method": b"POST", ":path": b"/v1/chat/completions",
           **{k: v.encode() for k, v in (headers or {}).items()}}
    try:
        decision = decide(tbl, raw, True, who, 0.0, dict)
    except GatewayError as refusal:
        return f"{refusal.status} {refusal.code}"
    assert isinstance(decision, Decision)
    return decision.route.name, decision.rule.name, decision.target.model


PAYMENTS = {"app": "payments"}


@pytest.mark.parametrize("who, host, headers, answer", [
    # sourceLabels: the payments workloads get the payments rule, everyone else the default
    pytest.param(caller(labels=PAYMENTS), DASH, {}, ("shop/dash", "payments", "qwen-max"), id="payments"),
    pytest.param(caller(labels={"app": "payments", "x": "y"}), DASH, {}, ("shop/dash", "payments", "qwen-max"),
                 id="more-labels-still-match"),
    pytest.param(caller(labels={"app": "web"}), DASH, {}, ("shop/dash", "rules[2]", "qwen-turbo"), id="web"),
    # headers and sourceLabels: both must hold
    pytest.param(caller(labels={"tier": "gold"}), DASH, {"user-type": "vip"}, ("shop/dash", "vip", "qwen-plus"),
                 id="vip-header-and-gold-label"),
    pytest.param(caller(labels={"tier": "silver"}), DASH, {"user-type": "vip"}, ("shop/dash", "rules[2]", "qwen-turbo"),
                 id="vip-header-without-the-label"),
    pytest.param(caller(labels={"tier": "gold"}), DASH, {}, ("shop/dash", "rules[2]", "qwen-turbo"),
                 id="the-label-without-the-header"),
    # a header claiming labels or an identity changes nothing
    pytest.param(caller(labels={"app": "web"}), DASH, {"app": "payments", "x-forwarded-client-cert": "By=payments",
                                                       "x-llm-gateway-caller": "shop/payments"},
                 ("shop/dash", "rules[2]", "qwen-turbo"), id="headers-claiming-an-identity"),
    # another namespace does not see shop's route (its default visibility): the provider's own host
    pytest.param(caller("team-a", PAYMENTS), DASH, {}, ("llm-gateway/qwen", "default", "qwen-turbo"),
                 id="another-namespace-gets-the-provider"),
    # workloadSelector: only the payments proxies of shop see the route; the others as if unknown
    pytest.param(caller(labels=PAYMENTS), "audit", {}, ("shop/audit", "rules[0]", "qwen-turbo"), id="selected"),
    pytest.param(caller(labels={"app": "web"}), "audit", {}, "404 unknown_host", id="not-selected"),
    pytest.param(caller("team-a", PAYMENTS), "audit.shop", {}, "404 unknown_host", id="selector-is-namespaced"),
    # a short host resolves in the caller's namespace; the qualified name anywhere it may be used
    pytest.param(caller("team-a"), "chat", {}, ("team-a/chat", "rules[0]", "qwen-turbo"), id="short-in-team-a"),
    pytest.param(caller("team-b"), "chat", {}, ("team-b/chat", "rules[0]", "qwen-turbo"), id="short-in-team-b"),
    pytest.param(caller("team-b"), "chat.team-b.svc.cluster.local", {}, ("team-b/chat", "rules[0]", "qwen-turbo"),
                 id="qualified"),
    pytest.param(caller("team-b"), "chat.team-a", {}, "404 unknown_host", id="qualified-but-not-exported"),
    pytest.param(caller("shop"), "chat", {}, "404 unknown_host", id="neither-namespace-sees-it"),
    # labels unknown (pod gone, API server out of reach): what depends on them fails closed
    pytest.param(caller(known=False), DASH, {}, "503 caller_unresolved", id="unknown-labels-sourceLabels"),
    pytest.param(caller(known=False), "audit", {}, "503 caller_unresolved", id="unknown-labels-selector"),
    pytest.param(caller("team-a", known=False), "chat", {}, ("team-a/chat", "rules[0]", "qwen-turbo"),
                 id="unknown-labels-do-not-matter-here"),
    pytest.param(caller("team-a", known=False), DASH, {}, ("llm-gateway/qwen", "default", "qwen-turbo"),
                 id="unknown-labels-elsewhere-the-provider"),
])
def test_what_a_caller_is_decided_by(who, host, headers, answer):
    assert ask(table(), who, host, headers) == answer


def test_an_ambiguous_short_host_says_which_namespaces_to_name():
    tbl = compile_in_namespaces(provider("qwen", DASH, namespace=HOME, api_key="k"),
                                route("chat", "chat", [rule(DASH)], namespace="a", exportTo=["*"]),
                                route("chat", "chat", [rule(DASH)], namespace="b", exportTo=["*"]),
                                route("chat", "chat", [rule(DASH)], namespace="c")).table
    with pytest.raises(GatewayError) as info:
        match(tbl, "chat", {}, Caller("d", "sa"))
    assert info.value.status == 404 and "several namespaces (a, b)" in info.value.message
    assert "chat.a" in info.value.message and ", c" not in info.value.message  # c's is not exported to d
    assert match(tbl, "chat.b", {}, Caller("d", "sa"))[0].name == "b/chat"
    # the control plane's namespace's short host is everyone's, before another namespace's
    shared = compile_in_namespaces(provider("qwen", DASH, namespace=HOME, api_key="k"),
                                   route("chat", "chat", [rule(DASH)], namespace="a", exportTo=["*"]),
                                   route("chat", "chat", [rule(DASH)], namespace=HOME)).table
    assert match(shared, "chat", {}, Caller("d", "sa"))[0].name == f"{HOME}/chat"
    assert match(shared, "chat", {}, Caller("a", "sa"))[0].name == "a/chat"


def test_a_hidden_route_on_a_providers_host_leaves_the_provider():
    """A workloadSelector hides the LLMRoute from other proxies: they get the host as if it did
    not exist, the provider's own (where they may use it)."""
    tbl = compile_in_namespaces(
        provider("qwen", DASH, "qwen-turbo", namespace=HOME, api_key="k", route_configs={"p": {"model": "qwen-max"}}),
        route("dash", DASH, [rule(DASH, name="p")], namespace="shop", workloadSelector={"matchLabels": PAYMENTS})).table
    assert ask(tbl, caller(labels=PAYMENTS), DASH) == ("shop/dash", "p", "qwen-max")
    assert ask(tbl, caller(labels={"app": "web"}), DASH) == ("llm-gateway/qwen", "default", "qwen-turbo")


def test_local_mode_caller_from_the_command_line(tmp_path):
    """Files: `--source-labels` drives sourceLabels; `--source-namespace` resolves short hosts
    and the namespace a workloadSelector applies in."""
    compiled = load_docs(tmp_path, provider("qwen", DASH, "qwen-turbo", api_key="k",
                                            route_configs={"payments": {"model": "qwen-max"}}),
                         route("dash", DASH, [payments_rule(), rule(DASH)]),
                         route("svc", "svc", [rule(DASH)], namespace="a"),
                         route("svc", "svc", [rule(DASH)], namespace="b"),
                         route("audit", "audit", [rule(DASH)], workloadSelector={"labels": PAYMENTS}))
    tbl = compiled.table
    assert ask(tbl, LOCAL, DASH) == ("default/dash", "rules[1]", "qwen-turbo")
    assert ask(tbl, local_caller(None, PAYMENTS), DASH) == ("default/dash", "payments", "qwen-max")
    assert ask(tbl, LOCAL, "audit") == "404 unknown_host"
    assert ask(tbl, local_caller("default", PAYMENTS), "audit") == ("default/audit", "rules[0]", "qwen-turbo")
    assert ask(tbl, local_caller("other", PAYMENTS), "audit") == "404 unknown_host"
    assert ask(tbl, LOCAL, "svc") == "404 unknown_host"  # two namespaces hold it: name one
    assert ask(tbl, local_caller("b"), "svc") == ("b/svc", "rules[0]", "qwen-turbo")
    assert ask(tbl, LOCAL, "svc.a") == ("a/svc", "rules[0]", "qwen-turbo")


def test_a_view_is_worked_out_once_per_caller_and_table():
    tbl = table()
    who = caller(labels=PAYMENTS)
    first = view_of(tbl, who)
    assert view_of(tbl, who) is first
    assert view_of(tbl, caller(labels=PAYMENTS)) is first  # another pod with the same namespace and labels
    assert view_of(tbl, caller(labels={"app": "web"})) is not first
    assert view_of(table(), who) is not first  # a new table
    # the payments caller's route is specialized: its rules hold no sourceLabels any more
    dash = first.routes[DASH]
    assert [r.name for r in dash.rules] == ["payments", "rules[2]"] and all(not r.sources for r in dash.rules)


def test_a_plain_table_costs_a_local_caller_nothing(tmp_path):
    compiled = load_docs(tmp_path, provider("qwen", DASH, api_key="k"), route("r", "chat", [rule(DASH)]))
    assert view_of(compiled.table, LOCAL).routes is compiled.table.routes


def test_match_says_why_a_rule_matched():
    tbl = table()
    assert match(tbl, DASH, {}, caller(labels=PAYMENTS))[2] == "matches[0]: sourceLabels app=payments"
    assert (match(tbl, DASH, {"user-type": "vip"}, caller(labels={"tier": "gold"}))[2]
            == "matches[0]: header user-type exact 'vip' and sourceLabels tier=gold")
    assert match(tbl, DASH, {}, caller())[2] == "it has no matches: every request"


def test_a_providers_workload_selector_keeps_its_own_host_to_the_selected_proxies():
    tbl = compile_in_namespaces(provider("own", "own.example.com", namespace="shop", api_key="k",
                                         workloadSelector={"labels": PAYMENTS})).table
    assert ask(tbl, caller(labels=PAYMENTS), "own.example.com") == ("shop/own", "default", "m-default")
    assert ask(tbl, caller(labels={"app": "web"}), "own.example.com") == "404 unknown_host"
    assert ask(tbl, caller(known=False), "own.example.com") == "503 caller_unresolved"
