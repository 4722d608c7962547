"""``gatelab localize``: GateBreaker's localisation of the neurons inside experts that fire
for one prompt set (z-score of the difference of means against another set)."""

from __future__ import annotations

import argparse

from ..io import atomic_dir, write_json
from ._common import (
    add_model_arguments,
    float_between,
    int_at_least,
    open_model,
    parse_experts,
    read_prompt_set,
)
from ._outputs import check_output

HELP = "neurons inside experts that fire for one prompt set (z-score)"
DESCRIPTION = (
    "GateBreaker's localisation: per-neuron max activation over routed tokens, "
    "difference of means between --target and --other, z-score > --threshold; writes "
    "neurons.json (a list `gatelab steer --clamp` takes)."
)


WRITES = ("neurons.json",)
"""What ``localize`` writes in ``--out`` (what ``--force`` may replace)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("localize", help=HELP, description=DESCRIPTION)
    add_model_arguments(p, sets=False)
    p.add_argument("--target", required=True, metavar="NAME=FILE")
    p.add_argument("--other", required=True, metavar="NAME=FILE")
    p.add_argument(
        "--experts",
        default=None,
        help="LAYER:E,E;LAYER:E (default: --top per layer by the target's routing contrast)",
    )
    p.add_argument(
        "--top", type=int_at_least(1), default=2, help="experts per layer when --experts is unset"
    )
    p.add_argument(
        "--threshold", type=float_between(), default=2.0, help="z-score threshold (default 2)"
    )


def run(args: argparse.Namespace) -> int:
    from ..inspect.localize import localize_neurons
    from ..inspect.profile import profile_routing

    out = check_output(args, writes=WRITES)
    if args.target.partition("=")[0] == args.other.partition("=")[0]:
        raise ValueError(
            "--target and --other need different names (NAME=FILE): they are contrasted"
        )
    experts = parse_experts(args.experts) if args.experts else None
    opened = open_model(args.model)
    target_name, target = read_prompt_set(args.target, opened, args.seq_len, args.max_prompts)
    other_name, other = read_prompt_set(args.other, opened, args.seq_len, args.max_prompts)
    if experts is None:  # the target set's top experts by contrast, per layer
        profile = profile_routing(opened.model, {target_name: target, other_name: other})
        experts = {}
        for layer, e, _ in profile.top_experts(target_name, args.top, per_layer=True):
            experts.setdefault(layer, []).append(e)
    report = localize_neurons(opened.model, target, other, experts, threshold=args.threshold)
    with atomic_dir(out, overwrite=args.force) as tmp:
        write_json(
            tmp / "neurons.json",
            {"target": target_name, "other": other_name, "experts": experts, **report.to_dict()},
            indent=1,
        )
    path = out / "neurons.json"
    print(
        f"{len(report.neurons)} neurons with z > {args.threshold} in "
        f"{len(report.experts)} experts; wrote {path}"
    )
    return 0
