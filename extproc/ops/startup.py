"""Starting a process: where its config comes from, the first config it must load, and the
one-line error that stops it from starting."""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..config.compile import Compiled
from ..config.file_source import FileSource
from ..config.kubernetes_source import KubernetesSource
from ..config.problems import ConfigError
from ..policy.gateway_binding import MESH_VIEW, View

IN_CLUSTER_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"


class StartupError(RuntimeError):
    """Something that stops the gateway from starting, said in one line for the user."""


def config_source(paths: list[str], kubernetes: bool, namespace: str | None,
                  apply: Callable[[Compiled], Awaitable[None]], reload_interval: float = 1.0,
                  key_env: dict[str, str] | None = None, home: str | None = None,
                  view: View = MESH_VIEW) -> FileSource | KubernetesSource:
    """The files, or the Kubernetes API server (where `${NAME}` expands only as `key_env` binds it,
    and `home` is the control plane's namespace, whose objects every namespace may use)."""
    if kubernetes:
        try:
            return KubernetesSource(apply, namespace, key_env=key_env or {}, home=home, view=view)
        except Exception as exc:  # no kubeconfig, unreadable service account
            raise StartupError(f"cannot reach Kubernetes: {exc}") from None
    return FileSource(paths, apply, reload_interval, view)


async def load_initial(source: FileSource | KubernetesSource) -> None:
    """The first config must load: there is no last good one to fall back on."""
    try:
        await source.load_initial()
    except ConfigError as exc:
        raise StartupError("the config has errors:\n" + str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot read the config: {exc}") from None
    except Exception as exc:
        if type(exc).__module__.startswith(("kubernetes", "urllib3")):
            raise StartupError(f"cannot list LLMProvider/LLMRoute objects from Kubernetes: {exc}") from None
        raise


def home_namespace(explicit: str | None = None, environ: dict | None = None) -> str | None:
    """The control plane's own namespace: the flag, else POD_NAMESPACE (the downward API), else
    the in-cluster ServiceAccount's namespace file, else unknown."""
    if explicit:
        return explicit
    found = (environ if environ is not None else os.environ).get("POD_NAMESPACE")
    if found:
        return found
    try:
        return Path(IN_CLUSTER_NAMESPACE_FILE).read_text().strip() or None
    except OSError:
        return None
