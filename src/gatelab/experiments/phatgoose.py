"""PHATGOOSE vs uniform merging vs the best single expert, zero-shot on held-out digit tasks.

Claim tested: "Learning to Route Among Specialized Experts for Zero-Shot Generalization"
(Muqeeth et al., ICML 2024, arXiv 2402.05859): routing per token and per module among
independently trained LoRA experts, with routers made post hoc from per-expert sigmoid gates,
generalises zero-shot to held-out tasks better than merging the experts (and other post-hoc
methods); the paper's pools are T0 / FLAN tasks on T5-XL (numbers not in our notes).

Protocol (ours):

- Data: scikit-learn's 8x8 digits (``gatelab.data.load_digits``); a task is the digits under
  one transformation of :mod:`gatelab.data.transforms` (train split to train, test split to
  report; noise drawn with a different seed for each split).
- Base: an MLP 64 -> 128 -> 128 -> 10 (ReLU), trained on upright digits (AdamW, lr 3e-3,
  600 steps of 128), then frozen and shared by every expert.
- Experts: one LoRA per expert task (``EXPERT_TASKS``) on all three linears, rank 8, alpha 8,
  400 steps, lr 1e-2; then its PHATGOOSE gates: 100 steps, lr 5e-3, 6% warm-up (the paper's
  gate recipe, batch 128 instead of 1024).
- Held-out tasks (``HELD_OUT``): transformations no expert saw, some near one expert
  (rot90+noise), some compositions (rot270 = rot90 then rot180, transpose, invert+noise) and one
  unrelated (shift).
- Arms on each task: the frozen base; uniform merging (the mean of the experts' ΔW); PHATGOOSE
  (top-2 per image and per layer); the oracle best single expert (the expert with the best
  accuracy on that task's test set, chosen with the labels: an upper bound, not a method).
- Held-in check: on each expert task, PHATGOOSE's accuracy next to the task's own expert
  (its LoRA alone, without the gate, as the routed model applies it), and the share of images
  whose top-1 routed expert is the task's expert, per layer.
- Each image is one token: routing is per image and per module. Mean ± sd over seeds (a seed
  sets the split, the initialisations and the noise).
"""

from __future__ import annotations

import statistics
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapt.phatgoose import (
    fit_classifier,
    phatgoose_layers,
    phatgoose_model,
    set_mode,
    train_gates,
    train_lora_expert,
)
from ..data import load_digits
from ..data.transforms import transform_images
from . import mean_pm_std

NAME = "phatgoose"
DESCRIPTION = "PHATGOOSE post-hoc routing of LoRA experts vs uniform merging vs best expert, digits"

EXPERT_TASKS = ("rot90", "rot180", "flip_lr", "flip_ud", "invert", "noise")
HELD_OUT = ("rot90+noise", "rot270", "transpose", "invert+noise", "shift")
TARGETS = ("0", "2", "4")
SCALES = {
    "smoke": {"seeds": 1, "base_steps": 20, "expert_steps": 10, "gate_steps": 5},
    "full": {"seeds": 3, "base_steps": 600, "expert_steps": 400, "gate_steps": 100},
}


def base_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
    )


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def one_seed(seed: int, cfg: dict) -> dict:
    data = load_digits(seed=seed)

    def task(split: str, name: str) -> tuple[Tensor, Tensor]:
        offset = {"train": 0, "test": 1}[split]
        images = transform_images(data[split].images, name, seed=10 * seed + offset)
        return images.flatten(1), data[split].labels

    torch.manual_seed(seed)
    base = base_mlp()
    x, y = task("train", "identity")
    fit_classifier(base, base.parameters(), x, y, steps=cfg["base_steps"], lr=3e-3, seed=seed)
    experts = []
    for i, name in enumerate(EXPERT_TASKS):
        x, y = task("train", name)
        steps = cfg["expert_steps"]
        expert = train_lora_expert(base, TARGETS, x, y, rank=8, steps=steps, seed=seed + i)
        train_gates(expert, x, y, steps=cfg["gate_steps"], seed=seed + i)
        experts.append(expert)
    mixed = phatgoose_model(base, experts, top_k=2)
    layers = list(phatgoose_layers(mixed).values())
    out: dict = {"held_out": {}, "held_in": {}}
    for name in HELD_OUT + EXPERT_TASKS:
        x, y = task("test", name)
        row = {"base": accuracy(base, x, y)}
        set_mode(mixed, "uniform")
        row["uniform"] = accuracy(mixed, x, y)
        singles = []
        for e in range(len(EXPERT_TASKS)):
            set_mode(mixed, e)
            singles.append(accuracy(mixed, x, y))
        set_mode(mixed, "route")
        row["phatgoose"] = accuracy(mixed, x, y)
        first = [layer.last_routing.experts[:, 0] for layer in layers]
        best = max(range(len(singles)), key=singles.__getitem__)
        row["oracle"], row["oracle_expert"] = singles[best], EXPERT_TASKS[best]
        if name in EXPERT_TASKS:
            e = EXPERT_TASKS.index(name)
            row["own"] = singles[e]
            row["routed_to_own"] = [(f == e).float().mean().item() for f in first]
            out["held_in"][name] = row
        else:
            counts = torch.stack([f.bincount(minlength=len(EXPERT_TASKS)) for f in first])
            row["top1_expert_per_layer"] = [EXPERT_TASKS[int(c.argmax())] for c in counts]
            out["held_out"][name] = row
    return out


def _fmt(values: list[float]) -> str:
    return mean_pm_std(values, 3)


def _common(values: list[str]) -> str:
    """The most frequent label over the seeds. Ties go to the label seen first in seed order
    (``Counter.most_common`` keeps first-seen order among equal counts), and are marked
    "(tie)", so the cell neither depends on set ordering nor hides a split vote."""
    ranked = Counter(values).most_common()
    label, count = ranked[0]
    tied = len(ranked) > 1 and ranked[1][1] == count
    return f"{label} (tie)" if tied else label


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    seeds = [seed + i for i in range(cfg["seeds"])]
    runs = [one_seed(s, cfg) for s in seeds]
    rows = [
        "| held-out task | frozen base | uniform merge | PHATGOOSE top-2 | best single expert "
        "(oracle) | oracle expert | most routed (layers 1/2/3) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in HELD_OUT:
        rs = [r["held_out"][name] for r in runs]
        most = [_common([r["top1_expert_per_layer"][i] for r in rs]) for i in range(3)]
        rows.append(
            f"| {name} | {_fmt([r['base'] for r in rs])} | {_fmt([r['uniform'] for r in rs])} | "
            f"{_fmt([r['phatgoose'] for r in rs])} | {_fmt([r['oracle'] for r in rs])} | "
            f"{_common([r['oracle_expert'] for r in rs])} | {' / '.join(most)} |"
        )
    rows += [
        "",
        "| expert task (held in) | its own expert | PHATGOOSE top-2 | uniform merge "
        "| routed to own expert, layers 1/2/3 |",
        "|---|---|---|---|---|",
    ]
    for name in EXPERT_TASKS:
        rs = [r["held_in"][name] for r in runs]
        share = " / ".join(
            f"{statistics.fmean(r['routed_to_own'][i] for r in rs):.2f}" for i in range(3)
        )
        rows.append(
            f"| {name} | {_fmt([r['own'] for r in rs])} | {_fmt([r['phatgoose'] for r in rs])} | "
            f"{_fmt([r['uniform'] for r in rs])} | {share} |"
        )
    return {"table": "\n".join(rows), "seeds": seeds, "config": cfg, "runs": runs}
