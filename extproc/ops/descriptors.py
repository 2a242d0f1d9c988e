"""The file descriptors Envoy needs for thousands of streams, set before `up` starts it.

Each request in flight holds about two descriptors in Envoy (the client's connection and, over
HTTP/1.1, its own connection to the provider). A common default of 1,024 open files (or the
20,000 of some containers) runs out long before the 10,000 requests the clusters admit
(`extproc.policy.capacity`); past it Envoy cannot accept or connect, and clients wait or get a
bare error instead of the gateway's 503. So `up` raises its own limit (Envoy inherits it) to
what its limits need: the soft limit up to the hard one, and the hard one too where the process
may (root, or CAP_SYS_RESOURCE), never above the kernel's `fs.nr_open`. Where it cannot, it says
how many streams the limit holds. Envoy is also told to accept no more downstream connections
than the limit holds (its `global_downstream_max_connections`), so it refuses a connection
cleanly rather than running out of descriptors half-way through a request.
"""

from __future__ import annotations

import logging
import resource
from dataclasses import dataclass
from pathlib import Path

from ..policy.capacity import connections_within, descriptors_needed, streams_within

log = logging.getLogger(__name__)

NR_OPEN = Path("/proc/sys/fs/nr_open")


@dataclass(frozen=True)
class DescriptorLimit:
    before: int  # the soft limit found
    now: int  # the soft limit set (what Envoy inherits)
    needed: int

    @property
    def unlimited(self) -> bool:
        return self.now == resource.RLIM_INFINITY

    @property
    def streams(self) -> int:
        """Requests in flight the limit holds (over HTTP/1.1 to providers: two descriptors each)."""
        return streams_within(self.now)

    @property
    def connections(self) -> int | None:
        """Client connections Envoy may accept within the limit; None: no limit."""
        return None if self.unlimited else connections_within(self.now)


def _kernel_ceiling() -> int:
    try:
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return 1 << 20


def raise_descriptor_limit(streams: int) -> DescriptorLimit:
    """Raise this process's open-files limit to hold `streams` requests in flight, as far as it
    may; a limit already high enough is left alone."""
    before, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = descriptors_needed(streams)
    infinite = resource.RLIM_INFINITY
    if before == infinite or before >= needed:
        return DescriptorLimit(before, before, needed)
    if hard != infinite and hard < needed:
        try:  # the hard limit too, where this process may (root, CAP_SYS_RESOURCE)
            ceiling = max(hard, min(needed, _kernel_ceiling()))
            resource.setrlimit(resource.RLIMIT_NOFILE, (before, ceiling))
            hard = ceiling
        except (ValueError, OSError):
            pass
    target = needed if hard == infinite else min(needed, hard)
    if target > before:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return DescriptorLimit(before, resource.getrlimit(resource.RLIMIT_NOFILE)[0], needed)


def report(limit: DescriptorLimit, streams: int) -> None:
    """One line at start: the limit Envoy gets, and a warning where it holds fewer than `streams`."""
    if limit.unlimited:
        return
    if limit.now >= limit.needed:
        log.info("open files: %d (was %d), room for %d requests in flight", limit.now, limit.before, limit.streams)
        return
    log.warning("open files: Envoy may open %d, room for about %d requests in flight, fewer than the %d its "
                "limits admit; raise the limit to %d (ulimit -n, or LimitNOFILE= in a systemd unit)",
                limit.now, limit.streams, streams, limit.needed)
