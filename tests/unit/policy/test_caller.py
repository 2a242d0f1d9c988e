"""The verified caller (extproc.policy.caller): its workload from owner references, label syntax,
and the keys budgets count callers under."""

from __future__ import annotations

import pytest

from extproc.policy.caller import (
    LOCAL,
    NO_LABELS,
    Caller,
    caller_key,
    label_problems,
    labels_of,
    local_caller,
    parse_labels,
    selects,
    workload_of,
)


@pytest.mark.parametrize("pod, labels, owners, workload", [
    pytest.param("payments-7d9f8c7b5-x2x4q", {"pod-template-hash": "7d9f8c7b5"},
                 [("ReplicaSet", "payments-7d9f8c7b5", True)], "payments", id="deployment"),
    pytest.param("rs-only-abcde", {}, [("ReplicaSet", "rs-only", True)], "rs-only", id="bare-replicaset"),
    pytest.param("db-0", {}, [("StatefulSet", "db", True)], "db", id="statefulset"),
    pytest.param("agent-xyz", {}, [("DaemonSet", "agent", True)], "agent", id="daemonset"),
    pytest.param("report-28000000-abcde", {}, [("Job", "report-28000000", True)], "report", id="cronjob"),
    pytest.param("migrate-abcde", {}, [("Job", "migrate", True)], "migrate", id="job"),
    pytest.param("lonely", {}, [], "lonely", id="no-owner: the pod itself"),
    pytest.param("p", {}, [("ReplicaSet", "x", False)], "p", id="owner-not-controller"),
])
def test_workload_from_owner_references(pod, labels, owners, workload):
    assert workload_of(pod, labels, owners) == workload


@pytest.mark.parametrize("text, labels", [
    ("app=payments", {"app": "payments"}),
    ("app=payments, tier=gold", {"app": "payments", "tier": "gold"}),
    ("example.com/team=a,version=", {"example.com/team": "a", "version": ""}),
])
def test_parse_labels(text, labels):
    assert parse_labels(text) == labels


@pytest.mark.parametrize("text, message", [
    ("app", "'app' is not KEY=VALUE"),
    ("bad key=x", "label key 'bad key'"),
    ("app=x y", "the value 'x y'"),
    ("UPPER.example/x=y", "prefix before '/' must be a DNS subdomain"),
    ("a=" + "v" * 64, "at most 63"),
])
def test_parse_labels_names_what_is_wrong(text, message):
    with pytest.raises(ValueError) as info:
        parse_labels(text)
    assert message in str(info.value)


def test_label_problems_name_each_label():
    assert label_problems({"ok": "fine", "-bad": "x", "k": "no spaces"}) == [
        "label key '-bad': the name must be 1 to 63 letters, digits, '-', '_' or '.', beginning and ending with a "
        "letter or digit",
        "label 'k': the value 'no spaces' must be at most 63 letters, digits, '-', '_' or '.', beginning and ending "
        "with a letter or digit (or empty)"]


def test_selectors_are_subsets():
    labels = labels_of({"app": "payments", "tier": "gold"})
    assert selects(labels_of({"app": "payments"}), labels)
    assert selects(NO_LABELS, labels)
    assert not selects(labels_of({"app": "payments", "tier": "silver"}), labels)
    assert not selects(labels_of({"app": "payments"}), NO_LABELS)


@pytest.mark.parametrize("kind, caller, key", [
    ("namespace", Caller("shop", "sa", "p-1", NO_LABELS, "payments"), "shop"),
    ("serviceAccount", Caller("shop", "sa", "p-1", NO_LABELS, "payments"), "shop/sa"),
    ("workload", Caller("shop", "sa", "p-1", NO_LABELS, "payments"), "shop/payments"),
    ("workload", Caller("shop", "sa", "p-1", None, None), None),  # the pod's workload not known: fail closed
    ("workload", Caller("shop", "sa"), "shop/"),  # a token bound to no pod: its namespace's pod-less bucket
    ("namespace", LOCAL, ""),
])
def test_caller_keys_of_budgets(kind, caller, key):
    assert caller_key(kind, caller) == key


def test_local_caller_as_the_operator_states_it():
    assert local_caller() is LOCAL and local_caller(None, {}) is LOCAL
    stated = local_caller("shop", {"app": "payments"})
    assert (stated.namespace, stated.name, stated.labels) == ("shop", "local", labels_of({"app": "payments"}))


def test_callers_compare_by_identity_fields_not_by_what_is_kept_on_them():
    a, b = Caller("shop", "sa"), Caller("shop", "sa")
    a.memo["view"] = object()
    assert a == b and a.labels_known and not Caller("shop", "sa", "p", None).labels_known
