"""``gatelab prune``: EASY-EP. Score experts on demonstrations, keep N per layer and write the
physically smaller model the way its source was stored."""

from __future__ import annotations

import argparse
import copy
from pathlib import Path

from torch import nn

from ..io import atomic_dir, write_json
from ._common import (
    OpenedModel,
    add_model_arguments,
    count_parameters,
    int_at_least,
    open_model,
    prompt_sets,
    read_prompt_set,
)
from ._outputs import check_output

HELP = "keep N experts per layer chosen from demonstrations (EASY-EP)"
DESCRIPTION = (
    "Score experts on --demos (EASY-EP's output-aware importance x token "
    "contribution, or routed-slot frequency), keep --keep per layer, and write the "
    "physically smaller model to OUT/model (HF: save_pretrained; gatelab: a checkpoint) "
    "and prune.json (kept experts, importance, parameter counts, loss on each --set for "
    "the full, masked and pruned model)."
)


WRITES = ("model", "prune.json")
"""What ``prune`` writes in ``--out`` (what ``--force`` may replace)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("prune", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("--demos", required=True, metavar="NAME=FILE", help="in-domain demonstrations")
    p.add_argument("--keep", type=int_at_least(1), required=True, help="experts to keep per layer")
    p.add_argument("--method", choices=("easy_ep", "frequency"), default="easy_ep")


def run(args: argparse.Namespace) -> int:
    from ..edit.prune import expert_importance, prune_model, select_experts
    from ..inspect.prompts import next_token_loss

    out = check_output(args, writes=WRITES)
    opened = open_model(args.model)
    _, demos = read_prompt_set(args.demos, opened, args.seq_len, args.max_prompts)
    importance = expert_importance(opened.model, demos, method=args.method)
    keep = select_experts(opened.model, importance, args.keep)
    sets = prompt_sets(args, opened)
    losses = _full_and_masked_losses(opened.model, keep, sets)
    pruned = prune_model(opened.model, keep)
    for n, p in sets.items():
        losses[n]["pruned"] = next_token_loss(pruned, p, n)
    model_dir = out / "model"
    result = {
        "method": args.method,
        "keep": args.keep,
        "kept": keep,
        "importance": {layer: v.tolist() for layer, v in importance.items()},
        "parameters": {"full": count_parameters(opened.model), "pruned": count_parameters(pruned)},
        "loss": losses,
        "model_dir": str(model_dir),
    }
    with atomic_dir(out, overwrite=args.force) as tmp:
        save_pruned(opened, pruned, tmp / "model")
        write_json(tmp / "prune.json", result, indent=1)
    path = out / "prune.json"
    print(
        f"kept {args.keep} experts per layer ({args.method}); parameters "
        f"{result['parameters']['full']:,} -> {result['parameters']['pruned']:,}"
    )
    for n, values in losses.items():
        print(f"{n}: loss " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    print(f"wrote {model_dir} and {path}")
    return 0


def _full_and_masked_losses(model: nn.Module, keep, sets) -> dict[str, dict[str, float]]:
    """Next-token loss per set of the full model and of the model with the pruned experts
    masked out (which the pruned model must reproduce: the check that pruning is exact)."""
    from ..edit.prune import restrict_experts
    from ..inspect.prompts import next_token_loss

    losses: dict[str, dict[str, float]] = {n: {} for n in sets}
    for n, p in sets.items():
        losses[n]["full"] = next_token_loss(model, p, n)
        with restrict_experts(model, keep):
            losses[n]["masked"] = next_token_loss(model, p, n)
    return losses


def save_pruned(opened: OpenedModel, pruned: nn.Module, directory: Path) -> Path:
    """Save a pruned model the way its source was stored: ``save_pretrained`` for HF (the
    tokenizer files copied along), a gatelab checkpoint whose recipe has the new
    ``num_experts`` otherwise (``gatelab eval``/``info`` and ``open_model`` read it)."""
    directory = Path(directory)
    if opened.kind == "hf":
        import shutil

        pruned.save_pretrained(directory)
        source = Path(opened.meta["path"])
        for f in source.glob("*"):
            if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
                shutil.copy(f, directory / f.name)
        return directory
    if opened.kind != "gatelab":
        raise ValueError("save_pruned needs a model opened from a directory")
    from ..inspect.access import find_moe_blocks
    from ..models import upgrade_model_table
    from ..train.checkpoint import save_checkpoint

    config = copy.deepcopy(opened.meta["config"])
    model = upgrade_model_table(config["run"].get("model", {}))
    model.setdefault("moe", {})["num_experts"] = find_moe_blocks(pruned)[0].num_experts
    config["run"]["model"] = model
    save_checkpoint(
        directory / "checkpoints",
        opened.meta["step"],
        pruned,
        config=config,
        extra={"pruned_from": opened.source},
        rng=False,
    )
    return directory
