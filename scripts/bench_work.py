"""Kept for the command the docs show: now `python -m benchmarks work` (benchmarks/); same flags."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.__main__ import main  # noqa: E402

sys.exit(main(["work", *sys.argv[1:]]))
