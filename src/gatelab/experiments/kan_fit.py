"""Function fitting: S-KAN vs single-space KAN vs GR-KAN vs MLP at matched parameter counts.

S-KAN ("Activation Space Selectable Kolmogorov-Arnold Networks", Yang et al., arXiv
2408.08338) reports beating single-space KANs on seven function-fitting tasks and MLPs of
the same parameter level. Its task list is not in our notes; we use the five symbolic
functions of KAN's toy study (Liu et al., arXiv 2404.19756, section 3.1), inputs uniform on
[-1, 1]^d:

- ``bessel``: J0(20 x)                                          (d = 1)
- ``exp_sin``: exp(sin(pi x) + y^2)                             (d = 2)
- ``xy``: x y                                                   (d = 2)
- ``exp_mean_sin2``: exp(mean_i sin^2(pi x_i / 2)), 100 inputs   (d = 100)
- ``exp_4d``: exp((sin(pi (x1^2 + x2^2)) + sin(pi (x3^2 + x4^2))) / 2)   (d = 4)

Models, all with one parameter budget per task, that of the S-KAN after pruning (the model
that is evaluated): S-KAN [d, 5, 1] over B-spline, Chebyshev, Fourier and RBF spaces with 8
functions each (half the steps mixing all spaces, a third moving each node's weights
linearly to the one-hot of its best space, then select, prune and train the last sixth); KAN [d, 5, 1] with the B-spline space alone (exactly the pruned S-KAN's count); GR-KAN
(two hidden layers, each a linear layer followed by a group-rational activation, 4 groups,
GELU init); MLP (two hidden SiLU layers). The hidden width of GR-KAN and MLP is the one
whose count is closest to the budget. Full-batch Adam with cosine decay on 1000 training
points, test RMSE on 1000 fresh points; KAN's paper trains with LBFGS and grid extension,
which we do not.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn

from ..layers.kan import SKAN, GroupRational

NAME = "kan-fit"
DESCRIPTION = "symbolic function fitting: S-KAN vs B-spline KAN vs GR-KAN vs MLP, matched params"

HIDDEN = 5
MODELS = ("s-kan", "kan", "gr-kan", "mlp")


def _bessel(x: Tensor) -> Tensor:
    return torch.special.bessel_j0(20 * x[:, 0])


def _exp_sin(x: Tensor) -> Tensor:
    return torch.exp(torch.sin(math.pi * x[:, 0]) + x[:, 1] ** 2)


def _xy(x: Tensor) -> Tensor:
    return x[:, 0] * x[:, 1]


def _exp_mean_sin2(x: Tensor) -> Tensor:
    return torch.exp(torch.sin(math.pi * x / 2).square().mean(1))


def _exp_4d(x: Tensor) -> Tensor:
    a = torch.sin(math.pi * (x[:, 0] ** 2 + x[:, 1] ** 2))
    b = torch.sin(math.pi * (x[:, 2] ** 2 + x[:, 3] ** 2))
    return torch.exp((a + b) / 2)


TASKS: dict[str, tuple[int, Callable[[Tensor], Tensor]]] = {
    "bessel": (1, _bessel),
    "exp_sin": (2, _exp_sin),
    "xy": (2, _xy),
    "exp_mean_sin2": (100, _exp_mean_sin2),
    "exp_4d": (4, _exp_4d),
}

SCALES = {
    "smoke": dict(tasks=["exp_sin"], seeds=1, steps=6, points=64),
    "full": dict(tasks=list(TASKS), seeds=3, steps=500, points=1000),
}


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class RationalNet(nn.Module):
    """Two hidden layers of linear -> group-rational (KAT's GR-KAN as a regression net)."""

    def __init__(self, dim: int, hidden: int, groups: int = 4):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, hidden),
            GroupRational(hidden, groups, "gelu"),
            nn.Linear(hidden, hidden),
            GroupRational(hidden, groups, "gelu"),
            nn.Linear(hidden, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def _mlp(dim: int, hidden: int) -> nn.Module:
    return nn.Sequential(
        nn.Linear(dim, hidden),
        nn.SiLU(),
        nn.Linear(hidden, hidden),
        nn.SiLU(),
        nn.Linear(hidden, 1),
    )


def _matched(build: Callable[[int], nn.Module], budget: int, step: int = 1) -> nn.Module:
    """The model of hidden width (a multiple of ``step``) whose count is closest to budget."""
    best, width = None, step
    while True:
        model = build(width)
        if best is None or abs(_count(model) - budget) < abs(_count(best) - budget):
            best = model
        if _count(model) > budget:
            return best
        width += step


def build_models(dim: int) -> dict[str, nn.Module]:
    skan = SKAN([dim, HIDDEN, 1])
    kan = SKAN([dim, HIDDEN, 1], spaces=["bspline"])
    kan.select()  # one space: selecting and pruning only drops the trivial mixing logits
    kan.prune()
    budget = _count(kan)  # = the pruned S-KAN's count: one space per node
    return {
        "s-kan": skan,
        "kan": kan,
        "gr-kan": _matched(lambda h: RationalNet(dim, h), budget, step=4),
        "mlp": _matched(lambda h: _mlp(dim, h), budget),
    }


def _rmse(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).squeeze(-1) - y).square().mean().sqrt())


def train(name: str, model: nn.Module, data: tuple[Tensor, ...], steps: int) -> dict:
    x, y, x_test, y_test = data
    lr = 1e-2
    # S-KAN: phase 1 mixes for the first half, phase 2 moves the weights to one-hot over the
    # next third, phase 3 selects, prunes and trains the last sixth
    anneal_at = steps // 2 if name == "s-kan" else steps
    select_at = 5 * steps // 6 if name == "s-kan" else steps
    # Our own loop, not _loop.train_loop: S-KAN's phases are the loop (freeze the weights,
    # anneal the selection, then select, prune and rebuild the optimizer mid-run, keeping the
    # cosine-decayed lr set per step on whichever optimizer is current).
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    extra = {}
    start = time.perf_counter()
    for step in range(steps):
        if step == anneal_at:  # the mixture of all spaces, end of phase 1
            extra["rmse_mixture"] = _rmse(model, x_test, y_test)
            model.freeze_weights()
        if anneal_at <= step < select_at:
            model.set_selection_strength((step - anneal_at + 1) / max(1, select_at - anneal_at))
        if step == select_at:  # S-KAN phases 2 and 3: keep each node's best space
            choice = model.select()
            model.prune()
            extra["selected"] = _space_counts(model, choice)
            opt = torch.optim.Adam(model.parameters(), lr=opt.param_groups[0]["lr"])
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        loss = (model(x).squeeze(-1) - y).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {
        "test_rmse": _rmse(model, x_test, y_test),
        "params": _count(model),
        "seconds": round(time.perf_counter() - start, 2),
        **extra,
    }


def _space_counts(model: SKAN, choice: list[Tensor]) -> dict[str, int]:
    spaces = model.layers[0].spaces
    picked = torch.cat(choice)
    return {s: int((picked == i).sum()) for i, s in enumerate(spaces)}


def make_data(task: str, points: int, seed: int) -> tuple[Tensor, ...]:
    dim, fn = TASKS[task]
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(2 * points, dim, generator=gen) * 2 - 1
    y = fn(x)
    return x[:points], y[:points], x[points:], y[points:]


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    rows = []
    for task in cfg["tasks"]:
        for s in range(seed, seed + cfg["seeds"]):
            data = make_data(task, cfg["points"], seed=1000 + s)
            torch.manual_seed(s)
            models = build_models(TASKS[task][0])
            for name, model in models.items():
                result = train(name, model, data, cfg["steps"])
                rows.append({"task": task, "seed": s, "model": name, **result})
    return {"table": _table(rows, cfg), "rows": rows}


def _table(rows: list[dict], cfg: dict) -> str:
    lines = [
        f"Test RMSE, mean (min-max) over {cfg['seeds']} seeds, {cfg['steps']} full-batch Adam "
        f"steps on {cfg['points']} points; params in brackets (S-KAN: after pruning)",
        "",
        "| task | "
        + " | ".join(MODELS)
        + " | S-KAN mixture, end of phase 1 | S-KAN spaces picked |",
        "|---|" + "---|" * (len(MODELS) + 2),
    ]
    for task in cfg["tasks"]:
        cells = []
        for model in MODELS:
            rs = [r for r in rows if r["task"] == task and r["model"] == model]
            vals = [r["test_rmse"] for r in rs]
            cells.append(
                f"{statistics.mean(vals):.4f} ({min(vals):.4f}-{max(vals):.4f}) [{rs[0]['params']}]"
            )
        sk = [r for r in rows if r["task"] == task and r["model"] == "s-kan"]
        mixture = statistics.mean(r["rmse_mixture"] for r in sk)
        picked: dict[str, int] = {}
        for r in sk:
            for space, n in r["selected"].items():
                picked[space] = picked.get(space, 0) + n
        spaces = ", ".join(f"{k} {v}" for k, v in picked.items() if v)
        lines.append(f"| {task} | " + " | ".join(cells) + f" | {mixture:.4f} | {spaces} |")
    return "\n".join(lines)
