"""Envoy's command line as `up` runs it: the access-log file written every second (not Envoy's
10 s), and at the default level no `misc` warnings about the gateway's own config."""

from __future__ import annotations

import pytest

from extproc.ops.up import UpOptions, envoy_args


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def test_the_access_log_is_flushed_every_second():
    args = envoy_args("/bin/envoy", "/tmp/b.json", UpOptions(config=[]))
    assert flag(args, "--file-flush-interval-msec") == "1000"
    assert args[:3] == ["/bin/envoy", "-c", "/tmp/b.json"]


@pytest.mark.parametrize(("level", "misc"), [("warning", "misc:error"), ("info", None), ("error", None)])
def test_misc_warnings_only_where_asked_for(level, misc):
    args = envoy_args("/bin/envoy", "/tmp/b.json", UpOptions(config=[], envoy_log_level=level))
    assert flag(args, "--log-level") == level
    assert flag(args, "--component-log-level") == misc
