"""The package's floors (docs/architecture.md): a module imports only from its own floor or
the floors above it, so data flows one way and a reader can stop at any floor."""

from __future__ import annotations

import ast
from pathlib import Path

import gatelab

FLOORS = [
    ("registry", "io", "legacy"),
    ("data",),
    ("routing",),
    ("experts",),
    ("dispatch",),
    ("layers",),
    ("models",),
    ("convert",),
    ("adapt",),
    ("hf",),
    ("inspect",),
    ("edit",),
    ("parallel",),
    ("train",),
    ("recipes",),
    ("ensemble",),
    ("experiments",),
    ("bench",),
    ("commands",),
    ("cli",),
    ("__init__", "__main__"),  # the package facade re-exports from every floor
]
FLOOR = {name: i for i, names in enumerate(FLOORS) for name in names}
ROOT = Path(gatelab.__file__).parent


def _top(module: Path) -> str:
    return module.relative_to(ROOT).parts[0].removesuffix(".py")


def _imported_tops(module: Path) -> set[str]:
    """The first component under gatelab of every import in ``module`` (function bodies
    included: a lazy import is still a dependency)."""
    package = module.relative_to(ROOT).parent.parts
    tops = set()
    for node in ast.walk(ast.parse(module.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                names = [parts] if parts else [[a.name] for a in node.names]
            elif node.module and node.module.split(".")[0] == "gatelab":
                parts = node.module.split(".")[1:]
                names = [parts] if parts else [[a.name] for a in node.names]
            else:
                continue
            tops.update(p[0] for p in names if p)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "gatelab" and len(parts) > 1:
                    tops.add(parts[1])
    return tops


def test_every_top_level_module_has_a_floor():
    tops = {_top(p) for p in ROOT.rglob("*.py")}
    assert tops <= set(FLOOR), f"add these to FLOORS: {sorted(tops - set(FLOOR))}"


def test_no_module_imports_from_a_lower_floor():
    upward = []
    for module in sorted(ROOT.rglob("*.py")):
        floor = FLOOR[_top(module)]
        for top in _imported_tops(module):
            if top in FLOOR and FLOOR[top] > floor and top != "__init__":
                upward.append(f"{module.relative_to(ROOT)} imports gatelab.{top}")
    assert not upward, "imports from a lower floor:\n" + "\n".join(upward)
