"""Child processes that never outlive us, and ports checked before a child is started.

`up` runs Envoy as a child. If `up` is killed outright (SIGKILL, the OOM killer), nothing of
ours runs to stop Envoy; left alone it would keep the listener port and answer 500 to every
request (its ext_proc is gone), and the next `up` could not bind. Linux can send a child a
signal when its parent dies (`PR_SET_PDEATHSIG`); it is set by a tiny Python launcher that then
execs Envoy (the signal survives exec), so Envoy starts with it already armed. Not in a
`preexec_fn`: that makes Python fork where it would otherwise vfork, and grpcio's fork handlers
then broke the parent's event engine now and then ("epoll_wait error: Bad file descriptor").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import signal
import socket
import sys
from collections.abc import Callable

from ..envoy.addresses import HostPort

PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGKILL, parent: int | None = None) -> Callable[[], None] | None:
    """A function that makes the calling process get `sig` when its parent (pid `parent`) dies,
    or None where the C library has no `prctl` (not Linux). A worker process calls it on itself,
    first thing (extproc.ops.workers)."""
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


# argv: parent pid, program, its arguments. Only the C library is loaded: it starts in ~20 ms.
_ARM_AND_EXEC = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    sys.exit(1)  # the parent died before the signal was armed\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n")


def dying_with_us(args: list[str]) -> list[str]:
    """`args` (a program and its arguments) run so that the program gets SIGKILL when this process
    dies, however it dies. Linux only; elsewhere `args` unchanged."""
    if not sys.platform.startswith("linux"):
        return args
    return [sys.executable, "-S", "-c", _ARM_AND_EXEC, str(os.getpid()), *args]


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


def listening_problems(flags: list[tuple[str, HostPort | None]]) -> list[str]:
    """Why any of a command's listening addresses (flag, address; None or port 0: not asked
    for, or any free port) cannot be listened on: checked together, before anything starts, so
    a busy port is named by its flag and nothing is left half started."""
    return [problem for flag, address in flags
            if address is not None and address.port and (problem := port_problem(flag, address))]
