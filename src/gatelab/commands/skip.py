"""``gatelab skip``: MoDES expert skipping. Layer importance on calibration prompts, the skip
ratio / KL / loss curve over one threshold, and the thresholds that reach target ratios.
The method lives in ``edit.skip``, which knows nothing of the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..edit.skip import MAPPINGS
from ..io import atomic_dir, write_json
from ._common import (
    add_model_arguments,
    float_between,
    int_at_least,
    open_model,
    positive,
    prompt_sets,
)
from ._outputs import check_output

HELP = "MoDES expert skipping: layer importance, skip ratio vs KL, thresholds"
DESCRIPTION = (
    "Compute MoDES's layer importance on the calibration --set(s), the skip "
    "ratio / KL / loss curve over one threshold, and the thresholds that reach each "
    "--target skip ratio (two sets: also one threshold per set, by the frontier search). "
    "Writes skip.json and skip.png. The model on disk is not changed."
)


WRITES = ("skip.json", "skip.png")
"""What ``skip`` writes in ``--out`` (what ``--force`` may replace)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("skip", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument(
        "--target",
        type=float_between(0.0, 1.0),
        action="append",
        default=[],
        help="target skip ratio in [0, 1] (repeatable; default 0.5)",
    )
    p.add_argument(
        "--grid",
        type=int_at_least(2),
        default=100,
        help="thresholds per grid (default 100, the reference's D)",
    )
    p.add_argument(
        "--mapping",
        choices=MAPPINGS,
        default="exp",
        help="how grid points become thresholds: exp (the reference's 2/(1+e^(-10(x-1))), "
        "the default), linear, or quantile (of the calibration scores)",
    )
    p.add_argument(
        "--tau-max",
        type=positive(float),
        default=1.0,
        help="upper end of the grid before the mapping (default 1: every score is reachable)",
    )


def run(args: argparse.Namespace) -> int:
    from ..edit.skip import SkipEvaluator, layer_importance, slot_scores, threshold_grid

    out = check_output(args, writes=WRITES)
    opened = open_model(args.model)
    sets = prompt_sets(args, opened)
    if not sets or len(sets) > 2:
        raise ValueError(
            "give one or two calibration sets with --set NAME=FILE (two: one token kind each)"
        )
    names = list(sets)
    prompts = [p for n in names for p in sets[n]]
    kinds = [i for i, n in enumerate(names) for _ in sets[n]]
    model = opened.model
    alpha = layer_importance(model, prompts)
    scores = slot_scores(model, prompts, alpha, kinds)
    grid = {"size": args.grid, "tau_max": args.tau_max, "mapping": args.mapping}
    one_grid = threshold_grid(torch.cat(scores), **grid)
    one = SkipEvaluator(model, prompts, alpha)
    curve = [one([t]) for t in one_grid]
    per_set = None
    if len(names) == 2:
        grids = [threshold_grid(s, **grid) for s in scores]
        per_set = (SkipEvaluator(model, prompts, alpha, kinds), grids)
    searches = _searches(args.target or [0.5], (one, [one_grid]), per_set)
    with atomic_dir(out, overwrite=args.force) as tmp:
        write_json(
            tmp / "skip.json",
            {
                "sets": names,
                "alpha": alpha,
                "grid": grid,
                "curve": [p.__dict__ for p in curve],
                "searches": searches,
            },
            indent=1,
        )
        _plot_curve(curve, tmp / "skip.png")
    path = out / "skip.json"
    print("layer importance: " + ", ".join(f"{k}: {v:.3f}" for k, v in alpha.items()))
    for s in searches:
        print(f"target {s['target']:.2f} ({s['search']}): {_describe(s['best'])}")
    print(f"wrote {path} and {out / 'skip.png'}")
    return 0


def _searches(targets: list[float], one, per_set) -> list[dict]:
    """For each target ratio, the best thresholds of the one-threshold search and (two sets)
    of the per-set search; ``one`` and ``per_set`` are (evaluator, grids) pairs."""
    from ..edit.skip import search_thresholds

    searches = []
    for target in targets:
        modes = [("1 threshold", *one)] + ([("per set", *per_set)] if per_set else [])
        for label, evaluator, grids in modes:
            best, _ = search_thresholds(evaluator, grids, target)
            searches.append(
                {"target": target, "search": label, "best": None if best is None else best.__dict__}
            )
    return searches


def _describe(best: dict | None) -> str:
    if best is None:
        return "no threshold reaches it"
    return (
        f"thresholds {[round(t, 5) for t in best['thresholds']]}, ratio {best['ratio']:.3f}, "
        f"KL {best['kl']:.4f}, loss {best['loss']:.4f}"
    )


def _plot_curve(curve, path: Path) -> None:
    """KL to the full model against the skip ratio, one point per threshold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p.ratio for p in curve], [p.kl for p in curve], "o-")
    ax.set_xlabel("skip ratio")
    ax.set_ylabel("KL to the full model (nats/token)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
