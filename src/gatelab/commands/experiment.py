"""``gatelab experiment NAME``: run an experiment that tests a paper's claim."""

from __future__ import annotations

import argparse

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
    experiment.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    experiment.add_argument(
        "--out", default=None, help="output directory (default runs/experiments/NAME)"
    )
    experiment.set_defaults(parser=experiment)


def run(args: argparse.Namespace) -> int:
    """``list``: the experiments; a name: print its table and write OUT/result.json."""
    from .. import experiments
    from ..bench.common import environment, utc_now
    from ..io import write_json

    if args.name == "list":
        for name in experiments.names():
            print(f"{name:24s} {experiments.get(name).description}")
        return 0
    try:
        experiment = experiments.get(args.name)
    except ValueError as error:
        args.parser.error(str(error))
    out = args.out or f"runs/experiments/{experiment.name}"
    started = utc_now()
    result = experiment.run(scale=args.scale, seed=args.seed, out_dir=out)
    result.update(
        command=getattr(args, "command_line", None), started=started, environment=environment("cpu")
    )
    print(result["table"])
    path = write_json(f"{out}/result.json", result)
    print(f"\nwrote {path} ({result['seconds']} s)")
    return 0
