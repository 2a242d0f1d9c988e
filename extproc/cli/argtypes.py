"""Argument types of the command line: each turns one flag's text into a value, or says in
one line what it expected (argparse prints it with the flag's name)."""

from __future__ import annotations

import argparse

from ..envoy.addresses import HostPort, is_ip
from ..policy.caller import parse_labels


def host_port(text: str) -> HostPort:
    try:
        return HostPort.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve(text: str) -> tuple[str, HostPort]:
    host, sep, target = text.partition("=")
    if not sep or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST=ADDR:PORT")
    return host.lower(), host_port(target)


def ip_port(text: str) -> HostPort:
    """IP:PORT: an address that needs no name resolved to reach (a DNS server's)."""
    address = host_port(text)
    if not is_ip(address.host):
        raise argparse.ArgumentTypeError(f"{text!r} is not IP:PORT (an IP address, not a name)")
    return address


def optional_host_port(text: str) -> HostPort | None:
    return None if text.lower() in ("", "none", "off") else host_port(text)


def size(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    try:
        if t and t[-1] in units:
            return int(float(t[:-1]) * units[t[-1]])
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (bytes, or with k/m suffix: 8m)") from None


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.001 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds between 0.001 and 3600")
    return value


def key_env(text: str) -> tuple[str, str]:
    name, sep, host = text.partition("=")
    if not sep or not name or not host:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=HOST")
    return name, host.lower()


def access_log_path(text: str) -> str | None:
    return None if text.lower() in ("", "none", "off") else text


def labels(text: str) -> dict[str, str]:
    """`--source-labels k=v[,k=v]`: Kubernetes label syntax."""
    try:
        return parse_labels(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def namespace(text: str) -> str:
    """A Kubernetes namespace name (a DNS label)."""
    import re

    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a namespace name (a lower-case DNS label)")
    return text


def day(text: str) -> str:
    """A UTC day, YYYY-MM-DD (passed on as written)."""
    import datetime

    try:
        datetime.date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a day (YYYY-MM-DD)") from None
    return text
