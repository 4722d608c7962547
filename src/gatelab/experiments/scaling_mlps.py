"""Scaling MLPs: the bottleneck MLP with the paper's training recipe, accuracy against width
and depth, on digits (and on CIFAR-10 when the user has the files).

Claim tested ("Scaling MLPs: A Tale of Inductive Bias", Bachmann, Anagnostidis, Hofmann;
NeurIPS 2023, arXiv 2306.13575; code ``gregorbachmann/scaling_mlps``): plain MLPs of
inverted-bottleneck residual blocks (:class:`gatelab.layers.BottleneckMLP`) improve with
scale, and the heavy augmentation recipe matters (the notes recall ~55-60% CIFAR-10 without
augmentation against the low-to-mid 70s with it, without pretraining; not confirmed).

The recipe (notes-blocks section 13, from the reference's defaults) and where this run departs:

- **LION** (Chen et al., "Symbolic Discovery of Optimization Algorithms", arXiv 2302.06675;
  :class:`Lion` below): betas (0.9, 0.99), decoupled weight decay. The paper's lr 5e-5 is for
  batch 4096 on ImageNet-21k; here batch 128 on small sets with lr 3e-4, weight decay 0.1
  (Lion's usual ~3-10x smaller lr and larger decay than AdamW's), linear warm-up then cosine.
- **Label smoothing 0.3** and **mixup with alpha 0.8**, as the paper.
- **Random resized crop and horizontal flip**: the crop keeps a random ``crop_scale`` share of
  the area at aspect ratio in [3/4, 4/3] and resizes it back (bilinear). CIFAR-10: scale
  (0.35, 1) and flips. Digits: scale (0.7, 1) and no flip, because a mirrored digit is another
  symbol (or none) and an 8x8 image cropped to a third of its area loses the digit.
- No test-time augmentation, no pretraining (the paper's headline numbers use both).

``run`` trains, per width (at a fixed depth) and per depth (at a fixed width), the same MLP
with the recipe and with no augmentation (plain cross entropy, same optimizer and steps), on
the digits' train split, and reports test accuracy (mean over seeds). When the environment
variable ``GATELAB_CIFAR10`` names a folder with the CIFAR-10 binary files
(:func:`gatelab.data.load_cifar10`), the same grid runs on CIFAR-10 too (inputs 3x32x32,
normalised per channel by the train set's mean and std); no CIFAR numbers are documented.
"""

from __future__ import annotations

import dataclasses
import math
import os
import statistics
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_cifar10, load_digits
from ..layers import BottleneckMLP
from ..train.schedule import WarmupCosine
from ._loop import random_batches, train_loop

NAME = "scaling-mlps"
DESCRIPTION = "bottleneck MLP with Lion + label smoothing + mixup + crops: accuracy vs width, depth"

SETTINGS = {
    "smoke": dict(widths=[16], depths=[1], base_width=16, base_depth=1, steps=10, seeds=[0]),
    "full": dict(
        widths=[16, 32, 64, 128],
        depths=[1, 2, 4],
        base_width=64,
        base_depth=2,
        steps=500,
        seeds=[0, 1],
    ),
}
CIFAR_ENV = "GATELAB_CIFAR10"


class Lion(torch.optim.Optimizer):
    """Lion (arXiv 2302.06675): ``p -= lr * (sign(b1 m + (1 - b1) g) + wd p)``, then
    ``m = b2 m + (1 - b2) g``."""

    def __init__(self, params, lr: float = 1e-4, betas=(0.9, 0.99), weight_decay: float = 0.0):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                m = self.state[p].setdefault("exp_avg", torch.zeros_like(p))
                update = (b1 * m + (1 - b1) * p.grad).sign_()
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(update, alpha=-group["lr"])
                m.mul_(b2).add_(p.grad, alpha=1 - b2)
        return loss


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Training settings (module docstring). ``mixup_alpha`` 0 turns mixup off,
    ``crop_scale`` None the crop."""

    steps: int = 1500
    batch_size: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.1
    label_smoothing: float = 0.3
    mixup_alpha: float = 0.8
    crop_scale: tuple[float, float] | None = (0.7, 1.0)
    flip: bool = False
    warmup_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(
                f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")
        if self.mixup_alpha < 0:
            raise ValueError(f"mixup_alpha must be >= 0 (0: off), got {self.mixup_alpha}")
        if self.crop_scale is not None:
            lo, hi = self.crop_scale
            if not 0.0 < lo <= hi <= 1.0:
                raise ValueError(
                    f"crop_scale must satisfy 0 < min <= max <= 1, got {self.crop_scale}"
                )

    def plain(self) -> Recipe:
        """The same optimisation without augmentation: no smoothing, mixup, crop or flip."""
        return dataclasses.replace(
            self, label_smoothing=0.0, mixup_alpha=0.0, crop_scale=None, flip=False
        )


def random_resized_crop(
    images: Tensor,
    scale: tuple[float, float],
    gen: torch.Generator,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = False,
) -> Tensor:
    """Per image: keep a random share in ``scale`` of the area at an aspect ratio in ``ratio``
    (log-uniform), anywhere inside the image, resized back to [N, C, H, W]; with ``flip``
    mirror half of the images left-right."""
    n = images.shape[0]
    area = torch.empty(n).uniform_(*scale, generator=gen)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    r = log_r.exp()
    w = (area * r).sqrt().clamp(max=1.0)
    h = (area / r).sqrt().clamp(max=1.0)
    # Centre anywhere that keeps the crop inside: [-1 + w, 1 - w] in normalised coordinates.
    cx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=gen) * 2 - 1) * (1 - h)
    sx = w
    if flip:
        sx = torch.where(torch.rand(n, generator=gen) < 0.5, -w, w)
    zero = torch.zeros(n)
    theta = torch.stack([torch.stack([sx, zero, cx], 1), torch.stack([zero, h, cy], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def mixup(x: Tensor, targets: Tensor, lam: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Mix each example and its soft target with a random partner: ``lam * a + (1 - lam) * b``
    (one lam per batch, drawn from Beta(alpha, alpha) by the caller, as the reference)."""
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lam must lie in [0, 1], got {lam}")
    perm = torch.randperm(x.shape[0], generator=gen)
    return lam * x + (1 - lam) * x[perm], lam * targets + (1 - lam) * targets[perm]


def train_mlp(
    model: nn.Module, x: Tensor, y: Tensor, recipe: Recipe, seed: int, num_classes: int = 10
) -> None:
    """Train ``model`` on images ``x`` [N, C, H, W] and labels ``y`` with ``recipe``."""
    gen = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)  # for mixup's Beta draws (torch's take no generator)
    opt = Lion(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = max(1, int(recipe.warmup_fraction * recipe.steps))
    schedule = WarmupCosine(opt, warmup_steps=warmup, total_steps=recipe.steps)
    eps = recipe.label_smoothing

    def batches():  # (images, soft targets): smoothed, cropped, mixed
        for idx in random_batches(len(x), min(recipe.batch_size, len(x)), gen):
            xb = x[idx]
            target = F.one_hot(y[idx], num_classes).float() * (1 - eps) + eps / num_classes
            if recipe.crop_scale is not None or recipe.flip:
                crop = recipe.crop_scale or (1.0, 1.0)
                xb = random_resized_crop(xb, crop, gen, flip=recipe.flip)
            if recipe.mixup_alpha > 0:
                lam = float(rng.beta(recipe.mixup_alpha, recipe.mixup_alpha))
                xb, target = mixup(xb, target, lam, gen)
            yield xb, target

    loss_fn = lambda m, b: -(b[1] * F.log_softmax(m(b[0]), -1)).sum(-1).mean()  # noqa: E731
    train_loop(model, loss_fn, batches(), opt, steps=recipe.steps, schedule=schedule)
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 1024) -> float:
    model.eval()
    hits = sum(
        int((model(x[i : i + batch_size]).argmax(-1) == y[i : i + batch_size]).sum())
        for i in range(0, len(x), batch_size)
    )
    return hits / max(len(x), 1)


def digits_data() -> dict[str, Tensor]:
    d = load_digits(seed=0)
    return {
        "train_x": d["train"].images,
        "train_y": d["train"].labels,
        "test_x": d["test"].images,
        "test_y": d["test"].labels,
    }


def cifar10_data(root: str | Path, limit: int | None = None) -> dict[str, Tensor]:
    """CIFAR-10 as float [N, 3, 32, 32], normalised per channel by the train set's mean and
    std; ``limit`` keeps the first examples of each split (for quick runs)."""
    train, test = load_cifar10(root, "train"), load_cifar10(root, "test")
    tx = train.images[:limit].float() / 255.0
    mean = tx.mean(dim=(0, 2, 3), keepdim=True)
    std = tx.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    return {
        "train_x": (tx - mean) / std,
        "train_y": train.labels[:limit],
        "test_x": (test.images[:limit].float() / 255.0 - mean) / std,
        "test_y": test.labels[:limit],
    }


def grid(
    data: dict[str, Tensor], configs: Iterable[tuple[int, int]], recipe: Recipe, seeds: list[int]
) -> list[dict]:
    """Test accuracy of ``BottleneckMLP(dim=width, num_blocks=depth)`` per (width, depth),
    trained with ``recipe`` ("recipe") and with ``recipe.plain()`` ("plain")."""
    x = data["train_x"]
    input_dim = math.prod(x.shape[1:])
    rows = []
    for width, depth in configs:
        row = {"width": width, "depth": depth}
        for arm, rec in (("recipe", recipe), ("plain", recipe.plain())):
            accs = []
            for seed in seeds:
                torch.manual_seed(seed)
                model = BottleneckMLP(input_dim, width, depth, 10)
                train_mlp(model, x, data["train_y"], rec, seed)
                accs.append(accuracy(model, data["test_x"], data["test_y"]))
            row[arm] = statistics.fmean(accs)
            row[f"{arm}_per_seed"] = accs
        row["parameters"] = sum(p.numel() for p in model.parameters())
        rows.append(row)
    return rows


def _configs(s: dict) -> list[tuple[int, int]]:
    by_width = [(w, s["base_depth"]) for w in s["widths"]]
    by_depth = [(s["base_width"], d) for d in s["depths"]]
    return by_width + [c for c in by_depth if c not in by_width]


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    s = SETTINGS[scale]
    seeds = [seed + k for k in s["seeds"]]
    digits = grid(digits_data(), _configs(s), Recipe(steps=s["steps"]), seeds)
    out = {"digits": digits}
    tables = ["Digits (8x8, 1,257 train / 360 test):", "", _table(digits, len(seeds))]
    root = os.environ.get(CIFAR_ENV)
    if root:
        cifar_recipe = Recipe(steps=s["steps"], crop_scale=(0.35, 1.0), flip=True)
        out["cifar10"] = grid(cifar10_data(root), _configs(s), cifar_recipe, seeds)
        tables += ["", f"CIFAR-10 (from {root}):", "", _table(out["cifar10"], len(seeds))]
    else:
        tables += ["", f"CIFAR-10: not run ({CIFAR_ENV} is not set to a folder with the files)."]
    return {"table": "\n".join(tables), **out}


def _table(rows: list[dict], seeds: int) -> str:
    lines = [
        f"| width | depth (blocks) | parameters | recipe acc (mean of {seeds}) | "
        "no-augmentation acc | recipe - plain |",
        "|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['depth']} | {r['parameters']} | {r['recipe']:.4f} | "
            f"{r['plain']:.4f} | {r['recipe'] - r['plain']:+.4f} |"
        )
    return "\n".join(lines)
