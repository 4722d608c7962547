"""``gatelab convert SOURCE [OUT]``: a run's distributed (DCP) checkpoint <-> single file."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "convert a --mesh run's DCP checkpoint to a single-file checkpoint (and back)"
DESCRIPTION = (
    "SOURCE is a --mesh run directory or one of its step_*.dcp checkpoints: its latest "
    "(or given) DCP checkpoint becomes a single-file checkpoint that gatelab eval, info "
    "and prune read (written to OUT, default the run's checkpoints/ directory, beside the "
    "DCP one). SOURCE a single-file checkpoint's .json: it becomes a DCP checkpoint in OUT "
    "(default: its own directory), to resume under --mesh."
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("convert", help=HELP, description=DESCRIPTION)
    p.add_argument("source", help="a run dir, a step_*.dcp directory or a checkpoint .json")
    p.add_argument("out", nargs="?", default=None, help="the checkpoints directory to write")


def run(args: argparse.Namespace) -> int:
    from ..io import ensure_writable_dir
    from ..recipes.convert import checkpoint_to_dcp, dcp_to_checkpoint, find_source

    kind, source = find_source(args.source)
    out = Path(args.out) if args.out else source.parent
    ensure_writable_dir(out, "output directory", "choose another OUT or fix its permissions")
    written = (dcp_to_checkpoint if kind == "dcp" else checkpoint_to_dcp)(source, out)
    print(json.dumps({"source": str(source), "written": str(written)}))
    return 0
