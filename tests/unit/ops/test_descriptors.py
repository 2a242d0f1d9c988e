"""`up` raises its open-files limit (Envoy inherits it) to hold the requests its clusters admit,
and says so where it cannot. Run in child processes: the test's own limit stays as it is."""

from __future__ import annotations

import subprocess
import sys

from support.helpers import REPO

CHILD = """
import logging, resource, sys
logging.basicConfig(level="INFO", format="%(levelname)s %(message)s", stream=sys.stdout)
from extproc.ops.descriptors import raise_descriptor_limit, report
limit = raise_descriptor_limit(int(sys.argv[1]))
report(limit, int(sys.argv[1]))
print("limit", limit.before, limit.now, resource.getrlimit(resource.RLIMIT_NOFILE)[0], limit.connections)
"""


def run(soft: int, hard: int, streams: int) -> tuple[list[int | None], str]:
    """The child's figures under a limit of `soft`/`hard` (lowered first; never raised here)."""
    script = (f"import resource, os, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
              f"os.execv(sys.executable, [sys.executable, '-c', {CHILD!r}, '{streams}'])")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    (figures,) = [line.split()[1:] for line in out.stdout.splitlines() if line.startswith("limit ")]
    return [None if f == "None" else int(f) for f in figures], out.stdout


def test_the_soft_limit_rises_to_what_the_streams_need():
    figures, out = run(1024, 8192, 2000)
    assert figures == [1024, 5024, 5024, 4000]  # 2 per stream + the reserve; connections: the limit - the reserve
    assert "INFO open files: 5024 (was 1024), room for 2000 requests in flight" in out


def test_a_limit_already_high_enough_is_left_alone():
    figures, out = run(8192, 8192, 100)
    assert figures == [8192, 8192, 8192, 7168]
    assert "WARNING" not in out


def test_past_the_hard_limit_it_raises_that_too_where_it_may_else_says_how_many_streams_fit():
    figures, out = run(1024, 3072, 10_000)
    if figures[1] == 21024:  # a process that may raise its hard limit (root with CAP_SYS_RESOURCE)
        assert figures[:3] == [1024, 21024, 21024] and "WARNING" not in out
        return
    assert figures[:3] == [1024, 3072, 3072]
    assert ("WARNING open files: Envoy may open 3072, room for about 1024 requests in flight, fewer than the 10000 "
            "its limits admit; raise the limit to 21024") in out
