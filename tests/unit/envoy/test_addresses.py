"""Addresses on the command line: HOST:PORT, [IPv6]:PORT, or :PORT on the loopback."""

from __future__ import annotations

import pytest

from extproc.envoy.addresses import HostPort


@pytest.mark.parametrize(("text", "expected"), [
    pytest.param("127.0.0.1:8443", HostPort("127.0.0.1", 8443), id="ipv4"),
    pytest.param("[::1]:8443", HostPort("::1", 8443), id="ipv6-bracketed"),
    pytest.param(":9000", HostPort("127.0.0.1", 9000), id="port-only"),
    pytest.param("fake:443", HostPort("fake", 443), id="name"),
])
def test_host_port_parse(text, expected):
    assert HostPort.parse(text) == expected


@pytest.mark.parametrize("text", [pytest.param("nohost", id="no-port"), pytest.param("h:port", id="not-a-number"),
                                  pytest.param("h:70000", id="port-too-big"), pytest.param("h:", id="empty-port")])
def test_host_port_parse_rejects(text):
    with pytest.raises(ValueError):
        HostPort.parse(text)
