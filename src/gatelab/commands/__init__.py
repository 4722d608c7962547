"""The ``gatelab`` commands: one module per command, each exporting

- ``add_parser(subparsers) -> None``: registers the command's parser (and its options) on
  the ``gatelab`` sub-command parsers;
- ``run(args) -> int``: runs it with the parsed arguments and returns the exit status.

``cli.main`` registers the modules of :data:`COMMANDS` in this order (the order of
``gatelab --help``) and runs the chosen one through the user-error funnel of
:mod:`gatelab.commands._common`. Add a command by writing its module and naming it here.
"""

from __future__ import annotations

import importlib
from types import ModuleType

COMMANDS = (
    "demo",
    "train",
    "convert",
    "eval",
    "info",
    "bench",
    "experiment",
    "profile",
    "localize",
    "steer",
    "prune",
    "skip",
    "pregate",
    "transcoder",
)
"""Command names; each is the module ``gatelab.commands.<name>``."""


def command(name: str) -> ModuleType:
    """The module of command ``name``."""
    if name not in COMMANDS:
        raise ValueError(f"unknown command {name!r}; valid: {', '.join(COMMANDS)}")
    return importlib.import_module(f"{__name__}.{name}")


__all__ = ["COMMANDS", "command"]
