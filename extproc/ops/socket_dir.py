"""Local mode's socket directory: only the gateway's user may open it.

Everything the ext_proc answers can carry a provider key, so in local mode the file system is
the check on who may talk to the control plane: its Unix sockets live in a directory of mode
0700, owned by the gateway's user.
"""

from __future__ import annotations

import os
import stat
import tempfile


def private_dir(path: str | None = None) -> str:
    """A directory only this user can open (0700), for local mode's Unix sockets: made if missing;
    an existing one must be a real directory owned by us with mode 0700, else it is refused (someone
    else could have made it, or could open it). None: a new temporary directory."""
    if path is None:
        return tempfile.mkdtemp(prefix="llm-gateway-")  # mode 0700
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    info = os.lstat(path)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{path} is not a directory")
    if info.st_uid != os.getuid():
        raise PermissionError(f"{path} belongs to another user (uid {info.st_uid})")
    if stat.S_IMODE(info.st_mode) != 0o700:
        raise PermissionError(f"{path} has mode {stat.S_IMODE(info.st_mode):o}: it must be 700 (chmod 700 {path})")
    return path


def default_socket_dir() -> str:
    """Where `serve` without TCP flags puts its sockets, and `envoy-config --socket-dir` looks."""
    return f"/tmp/llm-gateway-{os.getuid()}"


