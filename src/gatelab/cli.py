"""The ``gatelab`` command (also ``python -m gatelab``): the top-level parser and
:func:`main`. Each command is a module of :mod:`gatelab.commands`."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence

from . import __version__
from .commands import COMMANDS, command
from .commands._common import TRACEBACK_ENV, run_guarded

EPILOG = (
    "Errors a user can cause (a bad argument, recipe, file or checkpoint) end as one line "
    "'gatelab COMMAND: error: MESSAGE' and exit status 2. Set "
    f"{TRACEBACK_ENV}=1 to see their traceback instead."
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatelab",
        description="gatelab: routers, expert banks and fast dispatch for gated PyTorch models.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"gatelab {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        command(name).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``), run the command, return its exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["gatelab", *argv])
    return run_guarded(command(args.command).run, args)


if __name__ == "__main__":
    raise SystemExit(main())
