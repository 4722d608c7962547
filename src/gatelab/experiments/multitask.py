"""Multi-task experts against task correlation: shared-bottom, MMoE, CGC, PLE, HoME.

Claims. MMoE (Ma et al., KDD 2018, section 4.3, Figure 4): on its synthetic tasks the
shared-bottom model's loss grows as the tasks' correlation falls, while MMoE stays lower
and degrades less. HoME (arXiv 2408.05430) names two failures of MoE multi-task models:
expert collapse (ReLU experts with over 90% zero activations) and expert degradation
(shared experts taken over by one task); its experts (BatchNorm + Swish) and hierarchy are
meant to remove both.

Protocol. ``gatelab.data.mmoe_synthetic`` (two regression tasks; the cosine of their
weight vectors is the requested correlation p), 5,000 training and 2,000 test rows, the
same x for every p (paired). Each model is built under the same seed, trained with Adam
(lr 1e-3, batch 128) on the sum of the two tasks' MSE for a fixed number of epochs, and
evaluated by each task's test MSE on targets standardised with the training rows' mean and
standard deviation (so 1.0 is the loss of predicting the mean). Sizes are ours (the
paper's are not fully stated): 8 experts of 16 ReLU units for MMoE, CGC/PLE with 4 shared
+ 2 per task, HoME with 2 shared + 2 per group at each level and each task its own group
(two tasks leave no other grouping), towers of 8 units, a shared bottom of 128 units; the
parameter counts are in the table. The statistics are computed on the test set after
training: the mean over experts of the share of exactly-zero outputs (and its maximum),
and the largest share of one task in a shared expert's gate weight (0.5 is balanced, 1.0
is taken over).
"""

from __future__ import annotations

import statistics
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.synthetic import mmoe_synthetic
from ..models.multitask import PLE, HoME, MMoE, SharedBottom, expert_statistics
from ._loop import shuffled_batches, train_loop

NAME = "multitask"
DESCRIPTION = "shared-bottom vs MMoE vs CGC vs PLE vs HoME: task loss against task correlation"

SCALES = {
    "smoke": dict(train=500, test=200, epochs=1, seeds=1, correlations=(0.5, 1.0)),
    "full": dict(train=5_000, test=2_000, epochs=15, seeds=2, correlations=(0.0, 0.5, 0.9, 1.0)),
}
BATCH, LR, DIM = 128, 1e-3, 100

MODELS = {
    "shared-bottom": partial(SharedBottom, DIM, hidden_dim=128),
    "MMoE": partial(MMoE, DIM, num_experts=8),
    "CGC": partial(PLE, DIM, num_shared=4, num_specific=2, num_levels=1),
    "PLE (2 levels)": partial(PLE, DIM, num_shared=4, num_specific=2, num_levels=2),
    "HoME": partial(HoME, DIM, task_groups=[[0], [1]]),
}


def train_eval(name: str, data, cfg: dict, seed: int) -> dict:
    """Train one model on the first ``train`` rows; test MSE per task and expert stats."""
    torch.manual_seed(seed)
    model = MODELS[name]()
    n = cfg["train"]
    # standardise each task with the training rows' statistics, so MSE is a share of variance
    mean, std = data.y[:n].mean(0), data.y[:n].std(0)
    y_all = (data.y - mean) / std
    x, y = data.x[:n], y_all[:n]
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = lambda m, idx: F.mse_loss(m(x[idx]), y[idx], reduction="none").mean(0).sum()  # noqa: E731
    train_loop(model, loss_fn, shuffled_batches(len(x), BATCH, cfg["epochs"], gen), opt)
    model.eval()
    with torch.no_grad():
        pred = model(data.x[n:])
    mse = ((pred - y_all[n:]) ** 2).mean(0).tolist()
    stats = expert_statistics(model)
    shares = [max(s) for s in stats["task_share"].values()]
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "mse": mse,
        "zero_mean": statistics.fmean(stats["zero_share"].values()),
        "zero_max": max(stats["zero_share"].values()),
        "degradation": max(shares) if shares else None,  # no shared experts
    }


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = ".") -> dict:
    cfg = SCALES[scale]
    results: dict[str, dict[float, list[dict]]] = {m: {} for m in MODELS}
    for s in range(cfg["seeds"]):
        for p in cfg["correlations"]:
            data = mmoe_synthetic(cfg["train"] + cfg["test"], correlation=p, dim=DIM, seed=seed + s)
            for name in MODELS:
                results[name].setdefault(p, []).append(train_eval(name, data, cfg, seed + s))
    summary = {
        name: {str(p): _mean(runs) for p, runs in by_p.items()} for name, by_p in results.items()
    }
    return {"table": table(summary, cfg), "summary": summary}


def _mean(runs: list[dict]) -> dict:
    return {
        "parameters": runs[0]["parameters"],
        "mse": [statistics.fmean(r["mse"][t] for r in runs) for t in range(2)],
        "zero_mean": statistics.fmean(r["zero_mean"] for r in runs),
        "zero_max": statistics.fmean(r["zero_max"] for r in runs),
        "degradation": None
        if runs[0]["degradation"] is None
        else statistics.fmean(r["degradation"] for r in runs),
    }


def _fmt(value: float | None) -> str:
    return "n/a (no shared experts)" if value is None else f"{value:.2f}"


def table(summary: dict, cfg: dict) -> str:
    corr = [str(p) for p in cfg["correlations"]]
    head = " | ".join(f"p={p}: task 1 / task 2" for p in corr)
    lines = [f"| model | parameters | {head} |", "|---|---:|" + "---|" * len(corr)]
    for name, by_p in summary.items():
        cells = " | ".join(f"{by_p[p]['mse'][0]:.3f} / {by_p[p]['mse'][1]:.3f}" for p in corr)
        lines.append(f"| {name} | {by_p[corr[0]]['parameters']:,} | {cells} |")
    lines += [
        "",
        f"Test MSE per task (mean of {cfg['seeds']} seeds, {cfg['train']:,} training rows, "
        f"{cfg['epochs']} epochs). Expert statistics at p={corr[0]} and p={corr[-1]}:",
        "",
        "| model | zero-activation share (mean / max over experts) | largest one-task share "
        "of a shared expert's gate weight |",
        "|---|---|---|",
    ]
    for name, by_p in summary.items():
        zero = " ; ".join(
            f"p={p}: {by_p[p]['zero_mean']:.2f} / {by_p[p]['zero_max']:.2f}"
            for p in (corr[0], corr[-1])
        )
        deg = " ; ".join(f"p={p}: {_fmt(by_p[p]['degradation'])}" for p in (corr[0], corr[-1]))
        lines.append(f"| {name} | {zero} | {deg} |")
    return "\n".join(lines)
