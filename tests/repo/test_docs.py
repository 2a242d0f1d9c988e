"""The docs say what the code does: every flag of every `extproc` subcommand is in docs/cli.md,
in that subcommand's own section."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from extproc.cli.main import build_parser

DOCS = Path(__file__).resolve().parents[2] / "docs"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def flags(parser: argparse.ArgumentParser) -> list[str]:
    return [opt for action in parser._actions if not isinstance(action, argparse._HelpAction)
            for opt in action.option_strings]


def sections(text: str) -> dict[str, str]:
    """`## extproc NAME` headings and the text under each."""
    parts = re.split(r"^## extproc (\S+)\s*$", text, flags=re.MULTILINE)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def documented(flag: str, text: str) -> bool:
    return re.search(rf"`{re.escape(flag)}[` ,]", text) is not None


def test_every_flag_of_every_subcommand_is_in_docs_cli_md():
    doc = (DOCS / "cli.md").read_text()
    found = sections(doc)
    missing = []
    for name, sub in subcommands(build_parser()).items():
        if name not in found:
            missing.append(f"subcommand {name}: no '## extproc {name}' section")
            continue
        # --log-level is shared by every subcommand and documented once, at the top
        absent = [f for f in flags(sub) if f != "--log-level" and not documented(f, found[name])]
        if absent:
            missing.append(f"subcommand {name}: {', '.join(absent)} not in its section")
    assert documented("--log-level", doc.split("## ", 1)[0]), "--log-level not in docs/cli.md's introduction"
    assert not missing, "docs/cli.md lacks:\n" + "\n".join(missing)


def test_the_check_finds_a_missing_flag():
    """The test above would fail on an undocumented flag (a section without it)."""
    doc = "## extproc up\n| `--listen HOST:PORT` | x |\n"
    assert documented("--listen", sections(doc)["up"])
    assert not documented("--lis", sections(doc)["up"])
    assert not documented("--admin", sections(doc)["up"])
