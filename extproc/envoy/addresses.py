"""Addresses in Envoy's configuration: HOST:PORT as the command line gives it, socket
addresses, and the DNS resolver Envoy uses for names: the system's (as any program on the
host), or one DNS server (`--dns-resolver`)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass


@dataclass(frozen=True)
class HostPort:
    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_host: str = "127.0.0.1") -> HostPort:
        host, sep, port = text.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
            raise ValueError(f"{text!r} is not HOST:PORT")
        return cls(host.strip("[]") or default_host, int(port))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def socket_address(hp: HostPort) -> dict:
    return {"socket_address": {"address": hp.host, "port_value": hp.port}}


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


GETADDRINFO_RESOLVER = {
    "name": "envoy.network.dns_resolver.getaddrinfo",
    "typed_config": {"@type": "type.googleapis.com/"
                              "envoy.extensions.network.dns_resolver.getaddrinfo.v3.GetAddrInfoDnsResolverConfig"},
}


def dns_resolver(server: HostPort | None = None) -> dict:
    """The resolver of a cluster whose address is a name: the system's (`getaddrinfo`, so
    /etc/hosts and the host's DNS settings count), or c-ares asking `server` only.

    Each cluster gets its own resolver instance (Envoy makes one per cluster that configures
    one): a name that never answers occupies only its own cluster's lookups, never the others'."""
    if server is None:
        return GETADDRINFO_RESOLVER
    return {
        "name": "envoy.network.dns_resolver.cares",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.network.dns_resolver.cares.v3.CaresDnsResolverConfig",
            "resolvers": [socket_address(server)],
        },
    }
