"""The malloc tuning that keeps big body buffers on warm pages."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_big_buffers_reuse_warm_pages():
    """After the tuning, making and dropping 1 MiB buffers again and again takes no new page
    faults; glibc's defaults take about 256 per buffer (fresh pages every time)."""
    script = textwrap.dedent("""
        import resource, sys
        from extproc.ops.malloc import keep_body_buffers
        if sys.argv[1] == "tuned":
            assert keep_body_buffers()
        def faults():
            return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(3):
            bytearray(1 << 20)
        before = faults()
        for _ in range(200):
            b = bytearray(1 << 20)
            b = bytes(b)
            del b
        print(faults() - before)
    """)

    def faults(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", script, mode], capture_output=True, text=True, check=True)
        return int(out.stdout)

    assert faults("tuned") < 1_000  # one buffer's worth at most (256 pages), then none
    assert faults("default") > 200 * 100  # the untuned baseline: fresh pages for every buffer
