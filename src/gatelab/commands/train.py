"""``gatelab train RECIPE``: train the run a recipe describes."""

from __future__ import annotations

import argparse
import json

from ._common import int_at_least, is_main_process

TRAIN_HELP = "train a recipe (a shipped name such as moe-lm, or a .toml path)"
TRAIN_DESCRIPTION = (
    "Train the run a recipe describes. Shipped recipes: moe-lm, dense-lm, "
    "digits-moe, digits-dense. Metrics, routing telemetry and checkpoints go to the "
    "run directory ([train] run_dir, runs/<recipe> by default)."
)


def add_parser(subparsers) -> None:
    train = subparsers.add_parser("train", help=TRAIN_HELP, description=TRAIN_DESCRIPTION)
    train.add_argument("recipe", help="a shipped recipe name or a path to a .toml file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (TOML syntax), e.g. --set train.steps=200; repeatable",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    train.add_argument(
        "--ep",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="expert-parallel size under torchrun (experts sharded over N ranks; the rest "
        "data parallel), e.g. torchrun --nproc_per_node=2 -m gatelab train moe-lm --ep 2",
    )
    train.add_argument(
        "--mesh",
        default=None,
        metavar="SPEC",
        help="FSDP2 + expert parallelism on a device mesh under torchrun, e.g. "
        "torchrun --nproc_per_node=4 -m gatelab train moe-lm --mesh dp_shard=2,ep=2 "
        "(dimensions dp_replicate, dp_shard, ep; one may be -1; checkpoints are DCP)",
    )
    train.add_argument(
        "--mixed-precision",
        choices=("bf16",),
        default=None,
        help="with --mesh on GPUs: bf16 parameters and gradient reductions, fp32 master "
        "weights (FSDP2 MixedPrecisionPolicy); CPU runs stay fp32",
    )
    train.add_argument(
        "--global-routing",
        action="store_true",
        help="under torchrun: capacity drops and expert choice decide on the global batch "
        "(one all-gather per MoE layer) instead of each rank's tokens",
    )


def run(args: argparse.Namespace) -> int:
    """Train; rank 0 prints the result as one JSON line. 1 when training stopped early."""
    from ..recipes.run import run_recipe

    result = run_recipe(
        args.recipe,
        args.overrides,
        resume=args.resume,
        ep=args.ep,
        mesh=args.mesh,
        mixed_precision=args.mixed_precision,
        global_routing=args.global_routing,
    )
    if is_main_process():
        print(
            json.dumps(
                {
                    "step": result.step,
                    "stopped": result.stopped,
                    "loss": result.loss,
                    "eval": result.eval,
                    "checkpoint": str(result.checkpoint),
                }
            )
        )
    return 0 if result.stopped in ("completed", "time_budget", "interrupted") else 1
