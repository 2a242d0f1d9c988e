"""glibc malloc and Python's cycle collector tuned for a process that copies request bodies around
and builds many small short-lived objects per request.

A body passes through several buffers of its own size (socket reads, the gRPC message, the JSON
parse, the rewritten body, the answer's frames). By default glibc gives each big buffer fresh
pages (mmap, or heap it trims right after), so a 1 MiB body cost about 2,000 page faults and
6 ms of kernel time here. Keeping big buffers on the heap and the heap untrimmed up to a bound
makes later bodies reuse warm pages; the price is that up to `keep` bytes of freed memory stay
with the process after a burst of big bodies.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import logging

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3


def keep_body_buffers(largest: int = 32 << 20, keep: int = 64 << 20) -> bool:
    """Allocations up to `largest` from the heap; up to `keep` free bytes kept at its top.
    False (and nothing changed) where the C library is not glibc."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(M_MMAP_THRESHOLD, largest) == 1 and mallopt(M_TRIM_THRESHOLD, keep) == 1
    if not ok:
        log.debug("mallopt refused; glibc defaults kept")
    return ok


def give_back_free_heap(keep: int = 64 << 20) -> bool:
    """Return freed heap pages to the kernel after a burst of big bodies, keeping `keep` bytes at
    the heap's top warm. Needed because freed bodies sit between live objects, where the trim
    threshold never reaches them. False where the C library is not glibc."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    except (OSError, AttributeError, TypeError):
        return False
    trim.argtypes = (ctypes.c_size_t,)
    trim(keep)
    return True


# Python collects its youngest generation every 700 net new container objects by default: a few
# requests' worth here. A request's objects die with it (reference counting frees them); the
# collector only looks for cycles, which the request path does not make. Measured with the A/B
# of docs/performance.md: about 5 us of the ext_proc's CPU per request.
GC_THRESHOLDS = (50_000, 20, 100)


def collect_cycles_rarely() -> None:
    """The collector runs less often, and never walks what exists once the process has started
    (modules, the config), which `gc.freeze` sets aside."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
