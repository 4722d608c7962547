"""JEI-DNN learned exit gates vs confidence thresholding: accuracy/compute curve and ECE.

Claim tested: "Jointly-Learned Exit and Inference for a Dynamic Neural Network" (Regol,
Chataoui, Coates; ICLR 2024): gates trained jointly with the exit heads on the trade-off
CE + λ·cost give better accuracy for the compute than thresholding the heads' confidence, and
better calibrated predictions (thresholding biases the confidence of early exits upward). The
paper shows this on CIFAR / SVHN with T2T-ViT backbones; its numbers are not in our notes.

Protocol (ours):

- Data: scikit-learn's 8x8 digits, each image shown in one of the four right-angle
  orientations at random (:func:`gatelab.data.transforms.mixed_transform`; a seeded draw per
  split): plain digits are so easy that every exit scores the same, the mixture makes depth
  pay (the exits' accuracies rise with depth, see ``exit_accuracy``). Test split reported.
- Backbone: an MLP of 5 blocks Linear + ReLU, width 64, and a final linear head, trained on
  the task (AdamW, lr 3e-3, 1500 steps of 128), then frozen.
- Exits: a linear head after each of blocks 1-4, warm-up trained with the summed CE (400
  steps). These warm-up heads are the baseline's; the baseline exits at the first head whose
  max softmax is >= τ, for a grid of 400 τ in [0.1, 0.9999]. The same thresholding is also
  applied to each λ's JEI-DNN heads, so that only the exit rule differs ("the same heads").
- JEI-DNN (:mod:`gatelab.adapt.early_exit`): from the warm-up heads, 5 rounds of 100 gate steps
  then 100 head steps, for each λ in ``TRADEOFFS``; inference exits at the first gate >= 0.5.
- Compute: the multiply-adds run up to the exit taken (blocks, exit heads, gates), over those of
  the full path (final exit = 1). For each λ, the baseline's τ is the one whose test compute is
  closest to JEI-DNN's (matched compute). ECE: 15 equal-width bins of the chosen exit's max
  softmax. Mean ± sd over seeds (a seed sets the split, the orientations and the models).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..adapt.early_exit import (
    EarlyExitNet,
    confidence_exit,
    evaluate_exits,
    first_exit,
    train_exit_heads,
    train_jei,
)
from ..adapt.phatgoose import fit_classifier
from ..data import load_digits
from ..data.transforms import mixed_transform
from . import mean_pm_std

NAME = "early-exit"
DESCRIPTION = "JEI-DNN learned exit gates vs confidence thresholding: accuracy/compute and ECE"

ORIENTATIONS = ("identity", "rot90", "rot180", "rot270")
TRADEOFFS = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)
WIDTH, DEPTH = 64, 5
SCALES = {
    "smoke": {"seeds": 1, "backbone_steps": 20, "warmup_steps": 10, "rounds": 1, "steps": 5},
    "full": {"seeds": 3, "backbone_steps": 1500, "warmup_steps": 400, "rounds": 5, "steps": 100},
}
TAUS = torch.linspace(0.1, 0.9999, 400).tolist()


def build(seed: int) -> tuple[nn.Sequential, list[nn.Module], nn.Module]:
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Linear(64, WIDTH), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.ReLU()) for _ in range(DEPTH - 1)]
    head = nn.Linear(WIDTH, 10)
    return nn.Sequential(*blocks, head), blocks, head


def one_seed(seed: int, cfg: dict) -> dict:
    data = load_digits(seed=seed)

    def split(name: str, offset: int) -> tuple[Tensor, Tensor]:
        images, _ = mixed_transform(data[name].images, ORIENTATIONS, seed=100 * seed + offset)
        return images.flatten(1), data[name].labels

    (x, y), (xt, yt) = split("train", 0), split("test", 1)
    backbone, blocks, head = build(seed)
    fit_classifier(
        backbone, backbone.parameters(), x, y, steps=cfg["backbone_steps"], lr=3e-3, seed=seed
    )
    exits = [nn.Linear(WIDTH, 10) for _ in range(DEPTH - 1)]
    net = EarlyExitNet(blocks, head, exits, exits_after=list(range(DEPTH - 1)))
    train_exit_heads(net, x, y, steps=cfg["warmup_steps"], seed=seed)
    with torch.no_grad():
        base_logits = net.exit_logits(xt)
    baseline = [evaluate_exits(net, base_logits, confidence_exit(base_logits, t), yt) for t in TAUS]
    out = {
        "exit_accuracy": [(z.argmax(-1) == yt).float().mean().item() for z in base_logits],
        "costs": net.costs.tolist(),
        "final": evaluate_exits(net, base_logits, torch.full_like(yt, DEPTH - 1), yt),
        "jei": [],
        "matched_baseline": [],
        "matched_same_heads": [],
    }
    for lam in TRADEOFFS:
        model = copy.deepcopy(net)
        steps = cfg["steps"]
        train_jei(
            model, x, y, tradeoff=lam, rounds=cfg["rounds"], gate_steps=steps, head_steps=steps
        )
        with torch.no_grad():
            logits = model.exit_logits(xt)
            chosen = first_exit(torch.sigmoid(model.gate_logits(logits)), 0.5)
        jei = evaluate_exits(model, logits, chosen, yt)
        out["jei"].append(jei)
        out["matched_baseline"].append(_matched(baseline, jei["compute"]))
        same_heads = [evaluate_exits(model, logits, confidence_exit(logits, t), yt) for t in TAUS]
        out["matched_same_heads"].append(_matched(same_heads, jei["compute"]))
    return out


def _matched(curve: list[dict], compute: float) -> dict:
    """The point of a threshold sweep whose compute is closest to ``compute``, with its τ."""
    best = min(range(len(TAUS)), key=lambda i: abs(curve[i]["compute"] - compute))
    return {**curve[best], "tau": TAUS[best]}


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    seeds = [seed + i for i in range(cfg["seeds"])]
    runs = [one_seed(s, cfg) for s in seeds]
    rows = [
        "| λ | compute | JEI-DNN accuracy | JEI-DNN ECE | threshold, warm-up heads: accuracy "
        "| ECE | τ | threshold, JEI-DNN's heads: accuracy | ECE |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for i, lam in enumerate(TRADEOFFS):
        jei = [r["jei"][i] for r in runs]
        base = [r["matched_baseline"][i] for r in runs]
        same = [r["matched_same_heads"][i] for r in runs]
        rows.append(
            f"| {lam:g} | {mean_pm_std([j['compute'] for j in jei])} | "
            f"{mean_pm_std([j['accuracy'] for j in jei])} | {mean_pm_std([j['ece'] for j in jei])} | "
            f"{mean_pm_std([b['accuracy'] for b in base])} | {mean_pm_std([b['ece'] for b in base])} | "
            f"{mean_pm_std([b['tau'] for b in base])} | {mean_pm_std([b['accuracy'] for b in same])} | "
            f"{mean_pm_std([b['ece'] for b in same])} |"
        )
    gap = max(
        abs(b["compute"] - j["compute"])
        for r in runs
        for key in ("matched_baseline", "matched_same_heads")
        for b, j in zip(r[key], r["jei"], strict=True)
    )
    exit_acc = " / ".join(
        mean_pm_std([r["exit_accuracy"][k] for r in runs])
        for k in range(len(runs[0]["exit_accuracy"]))
    )
    final = [r["final"] for r in runs]
    rows += [
        "",
        f"Warm-up exit heads 1-4 and the final head, test accuracy: {exit_acc}. "
        f"Full depth alone: accuracy {mean_pm_std([f['accuracy'] for f in final])}, "
        f"ECE {mean_pm_std([f['ece'] for f in final])}, compute 1. Largest compute gap between a "
        f"JEI-DNN point and its matched threshold point: {gap:.3f}.",
    ]
    return {"table": "\n".join(rows), "seeds": seeds, "tradeoffs": list(TRADEOFFS), "runs": runs}
