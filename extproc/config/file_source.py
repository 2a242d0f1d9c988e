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
from dataclasses import replace
from pathlib import Path

from ..policy.gateway_binding import MESH_VIEW, View
from .backends import load_backends
from .compile import Compiled, compile_config
from .loader import config_files, load_paths
from .models import LLMDataPolicySpec
from .problems import ConfigError, Problem, errors, without_consequences

log = logging.getLogger(__name__)


def load_config(paths: Sequence[str | Path], environ: dict[str, str] | None = None, view: View = MESH_VIEW,
                log_warnings: bool = True) -> Compiled:
    """Load and compile; raise ConfigError listing every error: those of single objects and those
    across the objects that parsed, in one round. Warnings are logged (unless the caller prints
    them); the compiled config carries every problem that is not an error (warnings and notes,
    for `extproc validate`)."""
    objects, problems = load_paths(paths, environ)
    compiled = compile_config(objects, view, backends=load_backends(paths))
    # each object's own host (a data policy names several, and no route depends on it)
    hosts = {obj.label: spec.host for obj in objects if not isinstance(spec := obj.resource.spec, LLMDataPolicySpec)}
    problems = problems + without_consequences(problems, compiled.problems, hosts)
    if not objects and all(p.reason != "EmptyDirectory" for p in problems):  # nothing would be served
        problems.append(Problem(f"no LLMProvider, LLMRoute or LLMTokenRateLimit in {', '.join(map(str, paths))}: "
                                "every request is answered 404 until one is added", severity="warning",
                                reason="Empty"))
    if errors(problems):
        raise ConfigError(problems)
    if log_warnings:
        for problem in problems:
            if problem.severity == "warning":
                log.warning("%s", problem)
    return replace(compiled, problems=problems)


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

