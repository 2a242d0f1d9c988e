"""Control-plane credentials for end-to-end tests: a token file and the SDS file Envoy reads it
through, and the ext_proc client of issue 15 run as a separate process."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from extproc.envoy.bootstrap import token_sds

CLIENT = Path(__file__).parent / "ext_proc_client.py"


@dataclass(frozen=True)
class TokenFiles:
    token: str
    token_file: Path
    sds_file: Path

    def envoy_config_args(self) -> list[str]:
        return ["--token-file", str(self.token_file), "--token-sds", str(self.sds_file)]


def token_files(directory: Path, uid: int | None = None) -> TokenFiles:
    """A fresh token in `directory/token/token` (0600, owned by `uid` if given: Envoy's user)."""
    token = secrets.token_urlsafe(32)
    token_dir = directory / "token"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    token_file = token_dir / "token"
    token_file.write_text(token)
    token_file.chmod(0o600)
    sds = directory / "token-sds.json"
    sds.write_text(json.dumps(token_sds(str(token_file))))
    sds.chmod(0o644)
    if uid is not None:
        os.chown(token_dir, uid, uid)
        os.chown(token_file, uid, uid)
    return TokenFiles(token, token_file, sds)


def ext_proc_client(target: str, host: str, token: str | None = None, prefix: list[str] = ()) -> dict:
    """What the issue's client gets from TARGET for HOST; `prefix` runs it as someone else
    (`setpriv --reuid=...`, `ip netns exec ...`)."""
    result = subprocess.run([*prefix, sys.executable, str(CLIENT), target, host, *([token] if token else [])],
                            capture_output=True, text=True, timeout=60,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)
