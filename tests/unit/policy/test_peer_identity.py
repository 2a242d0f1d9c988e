"""Workload identities in certificates: the name a caller's certificate carries, which identity an
Envoy asking for a secret is granted, and the caller read back from a client certificate as the
egress gateway's Envoy reports it."""

from __future__ import annotations

import pytest

from extproc.policy.caller import LOCAL, Caller, local_caller
from extproc.policy.peer_identity import (
    LOCAL_NAMESPACE,
    WorkloadName,
    connection_lifetime,
    gateway_identity,
    granted,
    name_of,
    parse_peer,
    parse_spiffe,
    renewal_time,
    spiffe_id,
)

POD_CALLER = Caller("shop", "payments", "payments-7d9f-q8x2z", uid="0b6c-11aa")
SHOP = "spiffe://cluster.local/ns/shop/sa/payments"


def test_names():
    assert spiffe_id("shop", "payments") == SHOP
    assert gateway_identity("llm-gateway/llm-egress-gateway") == \
        "spiffe://cluster.local/ns/llm-gateway/sa/llm-egress-gateway"
    assert name_of(POD_CALLER) == WorkloadName("shop", "payments", "payments-7d9f-q8x2z", "0b6c-11aa")
    assert name_of(POD_CALLER).subject() == (("CN", "payments-7d9f-q8x2z"), ("serialNumber", "0b6c-11aa"))
    assert name_of(Caller("shop", "batch")).subject() == (("CN", "batch"),)  # a token bound to no pod
    # the operator's Envoy: its stated namespace, else the namespace files' objects are in
    assert name_of(LOCAL) == WorkloadName(LOCAL_NAMESPACE, "local")
    assert name_of(local_caller("team-a", {"app": "x"})) == WorkloadName("team-a", "local")


@pytest.mark.parametrize("requested, caller, operator, expected", [
    pytest.param("default", POD_CALLER, False, name_of(POD_CALLER), id="own-by-default"),
    pytest.param(SHOP, POD_CALLER, False, name_of(POD_CALLER), id="own-by-name-keeps-the-pod"),
    pytest.param("spiffe://cluster.local/ns/shop/sa/web", POD_CALLER, False, None, id="another-workload"),
    pytest.param("spiffe://cluster.local/ns/llm-gateway/sa/llm-egress-gateway", POD_CALLER, False, None,
                 id="a-gateway-identity"),
    pytest.param("spiffe://cluster.local/ns/llm-gateway/sa/egress", LOCAL, True,
                 WorkloadName("llm-gateway", "egress"), id="operator-names-a-gateway"),
    pytest.param("spiffe://cluster.local/ns/default/sa/local", LOCAL, False, None, id="no-namespace-never-by-name"),
    pytest.param("spiffe://example.org/ns/shop/sa/payments", LOCAL, True, None, id="other-trust-domain"),
    pytest.param("ROOTCA", POD_CALLER, True, None, id="not-an-identity"),
    pytest.param("spiffe://cluster.local/ns/Shop/sa/payments", LOCAL, True, None, id="not-a-namespace"),
])
def test_granted(requested, caller, operator, expected):
    assert granted(requested, caller, operator) == expected


@pytest.mark.parametrize("uri, subject, expected", [
    pytest.param(SHOP, "serialNumber=0b6c-11aa,CN=payments-7d9f-q8x2z",
                 WorkloadName("shop", "payments", "payments-7d9f-q8x2z", "0b6c-11aa"), id="pod"),
    pytest.param(SHOP, "CN=payments-7d9f-q8x2z,serialNumber=0b6c-11aa",
                 WorkloadName("shop", "payments", "payments-7d9f-q8x2z", "0b6c-11aa"), id="either-order"),
    pytest.param(SHOP, "CN=payments", WorkloadName("shop", "payments"), id="no-pod"),
    pytest.param(SHOP, "", None, id="no-subject"),
    pytest.param("spiffe://example.org/ns/shop/sa/payments", "CN=payments", None, id="other-trust-domain"),
    pytest.param("spiffe://cluster.local/ns/shop/sa/payments/extra", "CN=payments", None, id="longer-path"),
    pytest.param("https://cluster.local/ns/shop/sa/payments", "CN=payments", None, id="not-spiffe"),
    pytest.param(SHOP, "serialNumber=0b6c-11aa", None, id="uid-without-pod"),
    pytest.param(SHOP, "serialNumber=0b6c-11aa,CN=Bad_Pod", None, id="not-a-pod-name"),
    pytest.param(SHOP, "serialNumber=0b6c 11aa,CN=p", None, id="not-a-uid"),
    pytest.param(SHOP, "CN=p\\,serialNumber=x", None, id="escaped"),
    pytest.param(SHOP, "CN=a,CN=b", None, id="twice"),
])
def test_the_caller_a_client_certificate_names(uri, subject, expected):
    assert parse_peer(uri, subject) == expected


def test_parse_spiffe():
    assert parse_spiffe(SHOP) == ("shop", "payments")
    assert parse_spiffe("spiffe://cluster.local/ns/shop/sa/a.b") == ("shop", "a.b")
    assert parse_spiffe("spiffe://cluster.local/ns/-shop/sa/payments") is None


def test_renewal_and_connection_lifetime():
    # renewed at half the lifetime; no connection outlives the certificate it was made with
    assert renewal_time(1000.0, 4600.0) == 2800.0
    ttl = 3600.0
    issued = 1000.0
    renewed = renewal_time(issued, issued + ttl)
    assert renewed + connection_lifetime(ttl) <= issued + ttl
