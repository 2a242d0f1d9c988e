"""Child processes that never outlive us, and ports checked before a child is started.

`up` runs Envoy as a child. If `up` is killed outright (SIGKILL, the OOM killer), nothing of
ours runs to stop Envoy; left alone it would keep the listener port and answer 500 to every
request (its ext_proc is gone), and the next `up` could not bind. Linux can send a child a
signal when its parent dies (`PR_SET_PDEATHSIG`); it is set in the child between fork and
exec, so Envoy starts with it already armed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import socket
from typing import Callable

from .envoy_config import HostPort

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> Callable[[], None] | None:
    """A `preexec_fn` that makes the child get `sig` when this process dies, or None where the
    C library has no `prctl` (not Linux). Everything it needs is looked up here, before the
    fork: the child only makes two system calls.

    The signal goes with the thread that forked, so call the subprocess from the thread that
    lives as long as the process (the event loop's). Called in the child itself (a worker arming
    its own), `parent` is the parent's pid."""
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True).prctl
    except (OSError, AttributeError, TypeError):
        return None
    prctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong)
    parent = os.getpid() if parent is None else parent

    def arm() -> None:
        prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os.kill(os.getpid(), sig)

    return arm


def port_problem(flag: str, address: HostPort) -> str | None:
    """Why the child could not listen on `address` (named by its command-line flag), or None.
    Binds the way Envoy does (SO_REUSEADDR, so a port in TIME_WAIT is free) and lets go."""
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((address.host, address.port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"{flag} {address}: the port is in use by another process "
                        f"(an earlier gateway still running?); stop it or choose another port")
            if exc.errno == errno.EADDRNOTAVAIL:
                return f"{flag} {address}: not an address of this host"
            return f"{flag} {address}: cannot listen there: {exc.strerror or exc}"
    return None
