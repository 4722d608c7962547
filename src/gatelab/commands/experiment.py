"""``gatelab experiment NAME``: run an experiment that tests a paper's claim."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ._common import add_force_argument, int_at_least
from ._outputs import check_output

EXPERIMENT_HELP = "run an experiment that tests a paper's claim (see `gatelab experiment list`)"
EXPERIMENT_DESCRIPTION = (
    "Run one experiment of gatelab.experiments: print its table of measured "
    "numbers and write result.json (the numbers docs/results.md quotes come from here)."
)


def add_parser(subparsers) -> None:
    experiment = subparsers.add_parser(
        "experiment", help=EXPERIMENT_HELP, description=EXPERIMENT_DESCRIPTION
    )
    experiment.add_argument("name", help="experiment name, or 'list' to list them")
    experiment.add_argument(
        "--scale",
        choices=("smoke", "full"),
        default="full",
        help="full: the documented run (default); smoke: seconds, to check it runs",
    )
    experiment.add_argument(
        "--seed", type=int_at_least(0), default=0, help="random seed (default 0)"
    )
    experiment.add_argument(
        "--out",
        default=None,
        help="output folder, written whole and never over an earlier one without --force "
        "(default runs/experiments/NAME, plus -seedN for seed N > 0 and -smoke at smoke scale)",
    )
    add_force_argument(experiment)
    experiment.set_defaults(parser=experiment)


def run(args: argparse.Namespace) -> int:
    """``list``: the experiments; a name: print its table and write OUT/result.json."""
    from .. import experiments
    from ..bench.common import environment, utc_now
    from ..io import atomic_dir, write_json

    if args.name == "list":
        for name in experiments.names():
            print(f"{name:24s} {experiments.get(name).description}")
        return 0
    try:
        experiment = experiments.get(args.name)
    except ValueError as error:
        args.parser.error(str(error))
    args.out = args.out or default_out(experiment.name, args.scale, args.seed)
    out = check_output(args, writes=("*",), marker="result.json")
    started = utc_now()
    with atomic_dir(out, overwrite=args.force) as tmp:
        result = experiment.run(scale=args.scale, seed=args.seed, out_dir=tmp)
        result = relocated(result, tmp, out)
        result.update(
            command=getattr(args, "command_line", None),
            started=started,
            environment=environment("cpu"),
        )
        write_json(tmp / "result.json", result)
    print(result["table"])
    path = out / "result.json"
    print(f"\nwrote {path} ({result['seconds']} s)")
    return 0


def default_out(name: str, scale: str, seed: int) -> str:
    """``runs/experiments/NAME[-seedN][-smoke]``: runs of other seeds or scales do not
    collide with the documented one (seed 0, full)."""
    suffix = (f"-seed{seed}" if seed else "") + ("-smoke" if scale == "smoke" else "")
    return f"runs/experiments/{name}{suffix}"


def relocated(value, old: Path, new: Path):
    """``value`` with every string path under ``old`` (the temporary output folder) rewritten
    to ``new``, where it lies once the folder is renamed into place."""
    if isinstance(value, dict):
        return {k: relocated(v, old, new) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(relocated(v, old, new) for v in value)
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, str) and (value == str(old) or value.startswith(f"{old}{os.sep}")):
        return str(new) + value[len(str(old)) :]
    return value
