"""Clusters converted through per-kind templates are exactly what ParseDict makes of them."""

from __future__ import annotations

import pytest

from extproc.envoy.addresses import HostPort
from extproc.envoy.cluster_protos import ClusterProtos
from extproc.envoy.clusters import UpstreamOptions, provider_cluster, to_cluster_proto
from extproc.protocol import failover_cluster
from extproc.protocol import provider_cluster as cluster_name

HOSTS = ["a.example.com", "bb.example.com", "dashscope.aliyuncs.com", "localhost", "x.y", "p10.example.com",
         "fixed.example.com", "renamed.example.com"]


@pytest.mark.parametrize("options", [
    pytest.param(UpstreamOptions(), id="system-resolver"),
    pytest.param(UpstreamOptions(dns_resolver=HostPort("127.0.0.1", 5353), ca_file="/tmp/ca.pem"), id="dns-server"),
    pytest.param(UpstreamOptions(resolve={"fixed.example.com": HostPort("10.0.0.1", 8443),
                                          "renamed.example.com": HostPort("internal.example.com", 443)}),
                 id="resolve"),
])
def test_templates_give_what_parse_dict_gives(options):
    converter = ClusterProtos()
    for _ in range(2):  # the second round from the templates
        for host in HOSTS:
            for name, failover in ((cluster_name(host), False), (failover_cluster(host), True)):
                cluster = provider_cluster(name, host, options, failover=failover)
                assert converter.convert(cluster, name, host) == to_cluster_proto(cluster), (name, failover)
    assert len(converter._templates) < 4 * len(HOSTS)  # shared by hosts of equal shape (and lengths)


def test_names_it_cannot_template_are_converted_the_slow_way():
    converter = ClusterProtos()
    host = "bücher.example"  # not ASCII: its bytes are not as long as its characters
    cluster = provider_cluster("llm_provider_x", host, UpstreamOptions())
    assert converter.convert(cluster, "llm_provider_x", host) == to_cluster_proto(cluster)
    assert converter._templates == {}
