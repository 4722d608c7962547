"""``gatelab profile``: per layer x expert routing frequency and gate weight by prompt set
(MoTE's fTRI / GateBreaker's profile)."""

from __future__ import annotations

import argparse

from ..io import atomic_dir
from ._common import add_model_arguments, int_at_least, open_model, prompt_sets
from ._outputs import check_output

HELP = "per layer x expert routing frequency and gate weight by prompt set"
DESCRIPTION = (
    "Run named prompt sets through an MoE model (HF directory or gatelab "
    "checkpoint) and write profile.json (frequency, mean gate weight, each set's contrast "
    "with the others) and profile.png (heatmaps). MoTE's fTRI / GateBreaker's profile."
)


WRITES = ("profile.json", "profile.png")
"""What ``profile`` writes in ``--out`` (what ``--force`` may replace)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("profile", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("--metric", choices=("frequency", "mean_weight"), default="frequency")
    p.add_argument("--top", type=int_at_least(1), default=5, help="top experts to print per set")


def run(args: argparse.Namespace) -> int:
    from ..inspect.plots import plot_profile
    from ..inspect.profile import profile_routing

    out = check_output(args, writes=WRITES)
    opened = open_model(args.model)
    sets = prompt_sets(args, opened)
    if not sets:
        raise ValueError("give at least one prompt set with --set NAME=FILE")
    profile = profile_routing(opened.model, sets)
    with atomic_dir(out, overwrite=args.force) as tmp:
        profile.save_json(tmp / "profile.json")
        plot_profile(profile, tmp / "profile.png", metric=args.metric)
    for name in profile.names if len(profile.names) > 1 else []:
        top = profile.top_experts(name, args.top, metric=args.metric)
        rounded = [(a, b, round(c, 4)) for a, b, c in top]
        print(f"{name}: top experts (layer, expert, contrast) {rounded}")
    print(f"wrote {out / 'profile.json'} and {out / 'profile.png'}")
    return 0
