"""The package's layers (docs/development.md, "The layers"), checked from the code's own imports:
a module imports only from its own layer or below, and no two concerns import each other (no
circle between packages). Imports inside functions count as any: a cycle hidden in a function is
still a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "extproc"

# bottom first, as the page draws them
LAYERS = {
    "protocol": 1, "errors": 1, "protobuf_wire": 1,
    "telemetry": 2,
    "policy": 3,
    "config": 4, "translation": 4, "envoy": 4,
    "dataplane": 5,
    "ops": 6,
    "demo": 7, "testing": 7,
    "cli": 8, "__main__": 8, "__init__": 8,
}


def concern(module: str) -> str:
    """`extproc.policy.decide` -> `policy`; `extproc.errors` -> `errors`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """The `extproc...` modules a file imports, relative imports resolved."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    here = list(relative.parts[:-1])  # the package the file is in (for __init__.py: that package)
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("extproc."))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1] if node.level > 1 else here
                target = ".".join(base + ([node.module] if node.module else []))
                # `from . import answers`: the names may be modules themselves
                found.update(f"{target}.{a.name}" if not node.module else target for a in node.names)
            elif node.module and node.module.startswith("extproc."):
                found.add(node.module)
    return found


def package_graph() -> dict[str, dict[str, set[str]]]:
    """concern -> concern it imports -> the files that do."""
    graph: dict[str, dict[str, set[str]]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        source = concern(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts))
        for module in imports_of(path):
            target = concern(module)
            if target != source:
                graph.setdefault(source, {}).setdefault(target, set()).add(str(path.relative_to(PACKAGE.parent)))
    return graph


def test_every_concern_has_a_layer():
    concerns = {concern(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in PACKAGE.rglob("*.py")}
    assert concerns <= set(LAYERS), f"a concern without a layer (add it to the page and here): {concerns - set(LAYERS)}"


def test_imports_go_down_or_across_never_up():
    up = [f"{files} ({source}, layer {LAYERS[source]}) imports {target} (layer {LAYERS[target]})"
          for source, targets in package_graph().items() for target, files in targets.items()
          if LAYERS[target] > LAYERS[source]]
    assert up == []


def test_no_two_concerns_import_each_other():
    graph = package_graph()
    seen: list[str] = []

    def visit(node: str, path: list[str]) -> None:
        if node in path:
            seen.append(" -> ".join(path[path.index(node):] + [node]))
            return
        for target in graph.get(node, {}):
            visit(target, path + [node])

    for start in graph:
        visit(start, [])
    assert seen == []


@pytest.mark.parametrize(("source", "expected"), [
    ("from ..policy.table import Target", {"extproc.policy.table"}),
    ("from . import answers", {"extproc.dataplane.answers"}),
    ("import extproc.errors", {"extproc.errors"}),
    ("from extproc.demo.ca import ThrowawayCA", {"extproc.demo.ca"}),
])
def test_the_check_reads_each_form_of_import(monkeypatch, source, expected):
    """The check itself: each way a module names another is read (a check that read none would pass)."""
    fake = PACKAGE / "dataplane" / "processor.py"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source if self == fake else Path.read_text(self))
    assert imports_of(fake) == expected
