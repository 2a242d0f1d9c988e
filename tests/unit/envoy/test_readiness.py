"""What a starting Envoy waits for, in one sentence, from its admin interface's answers."""

from __future__ import annotations

import pytest

from extproc.envoy import readiness

CDS_OK = {"cluster_manager.cds.update_success": 1, "cluster_manager.cds.control_plane.connected_state": 1}


@pytest.mark.parametrize(("state", "stats", "warming", "unready", "expected"), [
    pytest.param(None, {}, [], [], "Envoy's admin interface to answer", id="admin-silent"),
    pytest.param("PRE_INITIALIZING", {}, [], [], "a connection to the control plane (xDS)", id="no-xds"),
    pytest.param("PRE_INITIALIZING", {"cluster_manager.cds.control_plane.connected_state": 1}, [], [],
                 "its clusters from the control plane (CDS)", id="no-clusters-yet"),
    pytest.param("PRE_INITIALIZING", {"cluster_manager.cds.update_rejected": 2}, [], [],
                 "rejected the control plane's", id="clusters-rejected"),
    pytest.param("PRE_INITIALIZING", {**CDS_OK, "cluster_manager.warming_clusters": 2},
                 [("llm_provider_a", "a.test"), ("llm_provider_b", "b.test")], [],
                 "2 cluster(s) warming, each waiting for its first DNS answer: llm_provider_a (a.test), "
                 "llm_provider_b (b.test)", id="warming"),
    pytest.param("PRE_INITIALIZING", {**CDS_OK, "cluster_manager.warming_clusters": 7},
                 [(f"c{i}", "") for i in range(7)], [], "c0, c1, c2, c3, c4 and 2 more", id="warming-many"),
    pytest.param("INITIALIZING", CDS_OK, [], ["shared target RdsRouteConfigSubscription RDS init llm_gateway"],
                 "its route configuration from the control plane (RDS)", id="routes"),
    pytest.param("INITIALIZING", {**CDS_OK, "listener_manager.total_listeners_warming": 1}, [], [],
                 "its listener", id="listener"),
    # an egress gateway's listener waits for its certificate and the CA bundle (as Envoy 1.40 names them)
    pytest.param("INITIALIZING", {**CDS_OK, "listener_manager.total_listeners_warming": 1}, [],
                 ["shared target SdsApi spiffe://cluster.local/ns/llm-gateway/sa/egress",
                  "shared target SdsApi ROOTCA"],
                 "its certificates from the control plane (SDS: spiffe://cluster.local/ns/llm-gateway/sa/egress, "
                 "ROOTCA): the control plane does not answer, or does not issue them", id="certificates"),
])
def test_waiting_for(state, stats, warming, unready, expected):
    assert expected in readiness.waiting_for(state, stats, warming, unready)


def test_admin_answers_are_read():
    stats = readiness.parse_stats("cluster_manager.warming_clusters: 3\nserver.state: 2\n"
                                  "cluster_manager.cds.version_text: \"1\"\n")
    assert stats == {"cluster_manager.warming_clusters": 3, "server.state": 2}
    cluster = {"name": "llm_provider_a", "load_assignment": {"endpoints": [{"lb_endpoints": [
        {"endpoint": {"address": {"socket_address": {"address": "a.test", "port_value": 443}}}}]}]}}
    one_resource = {"configs": [{"@type": "type.googleapis.com/envoy.admin.v3.ClustersConfigDump.DynamicCluster",
                                 "cluster": cluster}]}
    whole = {"configs": [{"dynamic_warming_clusters": [{"cluster": cluster}]}]}
    assert readiness.warming_clusters(one_resource) == readiness.warming_clusters(whole) == [
        ("llm_provider_a", "a.test")]
    assert readiness.warming_clusters({}) == []
    assert readiness.unready_targets({"unready_targets_dumps": [{"name": "m", "target_names": ["t1", "t2"]}]}) == [
        "t1", "t2"]
