"""The private directory of the gateway's Unix sockets: made 0700, reused only when it is ours and
still 0700, refused otherwise."""

from __future__ import annotations

import os
import stat

import pytest

from extproc.ops.socket_dir import private_dir


def test_private_dir(tmp_path):
    made = private_dir(str(tmp_path / "socks"))
    assert stat.S_IMODE(os.stat(made).st_mode) == 0o700
    assert private_dir(made) == made  # ours and 0700: reused
    os.chmod(made, 0o750)
    with pytest.raises(PermissionError, match="must be 700"):
        private_dir(made)
    (tmp_path / "file").write_text("")
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(str(tmp_path / "file"))
    os.symlink(tmp_path / "socks", tmp_path / "link")
    with pytest.raises(PermissionError, match="not a directory"):
        private_dir(str(tmp_path / "link"))
