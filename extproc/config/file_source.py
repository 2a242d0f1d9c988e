"""The file config source: load, validate, and reload when the files change.

A change is noticed by polling each file's size and modification time (once a second by
default), which works the same on every file system and in every container. A config with
any error never replaces the one in force: the errors are logged with file, object and field,
and the last good config keeps serving until the files are fixed.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from ..policy.gateway_binding import MESH_VIEW, View
from .compile import Compiled, compile_config
from .loader import config_files, load_paths
from .problems import ConfigError, errors

log = logging.getLogger(__name__)


def load_config(paths: Sequence[str | Path], environ: dict[str, str] | None = None, view: View = MESH_VIEW) -> Compiled:
    """Load and compile; raise ConfigError listing every error. Warnings are logged."""
    objects, problems = load_paths(paths, environ)
    compiled = compile_config(objects, view) if not errors(problems) else None
    if compiled is not None:
        problems = problems + compiled.problems
    if errors(problems):
        raise ConfigError(problems)
    for problem in problems:
        log.warning("%s", problem)
    assert compiled is not None
    return compiled


def _fingerprint(paths: Sequence[str | Path]) -> tuple[object, ...]:
    try:
        stats = [(f, f.stat()) for f in config_files(paths)]
        return tuple((str(f), st.st_mtime_ns, st.st_size) for f, st in stats)
    except (FileNotFoundError, OSError) as exc:
        return ("missing", str(exc))


class FileSource:
    """Watches config paths and hands each good config to `apply`."""

    def __init__(self, paths: Sequence[str | Path], apply: Callable[[Compiled], Awaitable[None]],
                 interval: float = 1.0, view: View = MESH_VIEW):
        self._paths = paths
        self._view = view
        self._apply = apply
        self._interval = interval
        self._seen: tuple[object, ...] | None = None

    async def load_initial(self) -> Compiled:
        """The first load must succeed: there is no last good config to fall back on."""
        self._seen = _fingerprint(self._paths)
        compiled = load_config(self._paths, view=self._view)
        await self._apply(compiled)
        return compiled

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            await self.check()

    async def check(self) -> bool:
        """Reload if the files changed. True when a new config was applied."""
        current = _fingerprint(self._paths)
        if current == self._seen:
            return False
        self._seen = current
        try:
            compiled = await asyncio.to_thread(load_config, self._paths, dict(os.environ), self._view)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("config rejected, the last good config stays in force: %s", problem)
            return False
        await self._apply(compiled)
        log.info("config reloaded (version %s)", compiled.table.version)
        return True

