"""``gatelab transcoder``: train a sparse transcoder replacing one MoE/MLP layer and evaluate
it (L0, fraction of variance explained, loss recovered). The method lives in
``adapt.transcoder``."""

from __future__ import annotations

import argparse

from torch import nn

from ..io import atomic_dir, write_json
from ._common import (
    add_model_arguments,
    float_between,
    int_at_least,
    open_model,
    read_prompts,
    save_state,
)
from ._outputs import check_output

HELP = "train a sparse transcoder replacing one MoE/MLP layer"
DESCRIPTION = (
    "Train a transcoder (wide ReLU features, L1, unit-norm decoder rows) on "
    "the input/output of one layer over the --set prompts, and report L0, fraction of "
    "variance explained and loss recovered (against zero ablation) on --eval (default: "
    "the training prompts). Writes transcoder.json and transcoder.safetensors."
)


WRITES = ("transcoder.json", "transcoder.safetensors")
"""What ``transcoder`` writes in ``--out`` (what ``--force`` may replace)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("transcoder", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--layer", type=int_at_least(0), help="an MoE layer (its block)")
    where.add_argument("--module", help="any module by qualified name (e.g. blocks.1.ffn)")
    p.add_argument("--eval", dest="eval_sets", action="append", default=[], metavar="NAME=FILE")
    p.add_argument(
        "--hidden-dim", type=int_at_least(1), default=None, help="features (default 8 x dim)"
    )
    p.add_argument(
        "--l1", type=float_between(0.0), default=1e-3, help="L1 coefficient (default 1e-3)"
    )
    p.add_argument(
        "--steps", type=int_at_least(1), default=1000, help="training steps (default 1000)"
    )


def run(args: argparse.Namespace) -> int:
    from ..inspect.readout import module_io
    from ..inspect.transcoder import evaluate_transcoder, train_transcoder

    out = check_output(args, writes=WRITES)
    opened = open_model(args.model)
    model = opened.model
    train = read_prompts(args, opened, args.sets)
    if not train:
        raise ValueError("give at least one training set with --set NAME=FILE")
    held = read_prompts(args, opened, args.eval_sets) or train
    module = _target_module(model, args)
    x, y = module_io(model, module, train)
    hidden = 8 * x.shape[1] if args.hidden_dim is None else args.hidden_dim
    tc, history = train_transcoder(x, y, hidden, l1=args.l1, steps=args.steps)
    report = evaluate_transcoder(model, module, tc, held)
    record = {
        "layer": args.layer,
        "module": args.module,
        "hidden_dim": hidden,
        "l1": args.l1,
        "steps": args.steps,
        "train_tokens": x.shape[0],
        "final_loss": history.final_loss,
        **report,
    }
    with atomic_dir(out, overwrite=args.force) as tmp:
        save_state(tc, tmp / "transcoder.safetensors")
        write_json(tmp / "transcoder.json", record, indent=1)
    path = out / "transcoder.json"
    print(
        f"L0 {report['l0']:.1f} of {hidden}, FVE {report['fve']:.3f}, loss recovered "
        f"{report['loss_recovered']:.3f} (clean {report['loss_clean']:.4f}, zero-ablated "
        f"{report['loss_zero_ablated']:.4f}, transcoder {report['loss_transcoder']:.4f})"
    )
    print(f"wrote {path} and {out / 'transcoder.safetensors'}")
    return 0


def _target_module(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """The module named by --module, or the block of MoE layer --layer."""
    from ..inspect.access import select_blocks

    if args.module is None:
        return select_blocks(model, [args.layer])[0].module
    modules = dict(model.named_modules())
    if args.module not in modules or not args.module:
        raise ValueError(
            f"--module {args.module!r} is not a module of the model; see gatelab info for the names"
        )
    return modules[args.module]
