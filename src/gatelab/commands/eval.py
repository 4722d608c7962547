"""``gatelab eval CHECKPOINT``: evaluate a checkpoint as its recipe says."""

from __future__ import annotations

import argparse
import json
import math

from ._common import add_checkpoint_parser, checkpoint_meta

HELP = "evaluate a checkpoint (or a run directory's latest) as its recipe says"
DESCRIPTION = (
    "Rebuild the model and evaluation from the recipe stored in a checkpoint, "
    "load its weights and print the evaluation metrics as JSON."
)


def add_parser(subparsers) -> None:
    add_checkpoint_parser(subparsers, "eval", help=HELP, description=DESCRIPTION)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..recipes.run import build_run
    from ..train.checkpoint import load_checkpoint

    path, meta = checkpoint_meta(args.checkpoint)
    run = build_run(meta["config"]["run"])
    load_checkpoint(path, run.model, rng=False)
    run.model.eval()
    with torch.no_grad():
        metrics = run.eval_fn(run.model)
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:  # never a NaN metric with exit status 0
        raise ValueError(
            f"evaluating {path} gave non-finite {', '.join(bad)}: its weights hold NaN"
        )
    print(json.dumps({"checkpoint": str(path), "step": meta["step"], **metrics}))
    return 0
