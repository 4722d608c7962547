"""DynaMoE's layer-wise capacity schedules on digits: does descending beat uniform?

Claim tested: "DynaMoE: Dynamic Token-Level Expert Activation with Layer-Wise Adaptive
Capacity for Mixture-of-Experts Neural Networks" (Gülmez, arXiv 2603.01697) finds that on
image classification (MNIST, Fashion-MNIST, CIFAR-10) a descending schedule of the
per-layer maximum number of experts K_max beats the uniform one, by up to 5.47% accuracy.

Protocol (ours; the paper's models and budgets were not available):

- Data: scikit-learn's 8x8 digits (``gatelab.data.load_digits``), 64 pixels flattened;
  trained on the train split, reported on the test split (20%, every class).
- Model: ``gatelab.models.MLPClassifier``, a dense layer 64 -> 64 then four residual MoE
  layers of width 64 (8 plain GELU experts of width 32 each), a linear head. Every MoE
  layer routes with ``dynamic_k`` (gatelab's reading of percentile-thresholded gating:
  see :class:`gatelab.routing.DynamicKRouter`) at percentile 0.75, so before the per-layer
  clamp a token takes (1 - 0.75) * 8 = 2 experts on average; ``k_schedule`` sets each
  layer's K_max between 1 and 4 (``gatelab.routing.K_SCHEDULES``). Switch balance loss 0.01.
- Training: AdamW (lr 3e-3, weight decay 0.01), batch 64, the same batches and the same
  initialisation for every schedule within a seed (the layers' K_max does not change the
  parameter shapes).
- Reported: test accuracy and cross entropy (mean and standard deviation over seeds), the
  measured experts per token on the test set (eval mode, so the routers' running
  thresholds) overall and per MoE layer, and the paired per-seed accuracy difference of
  each schedule against uniform.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch

from ..data import load_digits
from ..models import MLPClassifier, MLPConfig
from ..routing import K_SCHEDULES

NAME = "dynamoe"
DESCRIPTION = "DynaMoE K_max schedules (uniform, descending, ...) with dynamic-k routing on digits"

SCALES = {
    "smoke": {"steps": 8, "seeds": 1, "schedules": ["uniform", "descending"]},
    "full": {"steps": 400, "seeds": 4, "schedules": None},  # None: every schedule
}
SCHEDULE_ORDER = ["uniform", "descending", "ascending", "pyramid", "valley", "wave"]


def model_config(schedule: str) -> MLPConfig:
    return MLPConfig(
        input_dim=64,
        hidden_dims=[64, 64, 64, 64, 64],
        num_classes=10,
        act="gelu",
        moe_layers=[1, 2, 3, 4],
        num_experts=8,
        top_k=4,
        expert_hidden_dim=32,
        router="dynamic_k",
        router_kwargs={"percentile": 0.75},
        k_schedule=schedule,
        k_schedule_min=1,
        loss_weights={"balance": 0.01},
    )


def train_one(schedule: str, seed: int, steps: int, data) -> dict:
    """Train one model; return its test metrics and measured experts per token."""
    torch.manual_seed(seed)
    model = MLPClassifier(model_config(schedule))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    x_train = data["train"].images.flatten(1)
    y_train = data["train"].labels
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(y_train), (64,), generator=gen)
        out = model(x_train[idx], y_train[idx])
        opt.zero_grad(set_to_none=True)
        out.total_loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(data["test"].images.flatten(1), data["test"].labels)
    per_layer = [
        float(moe.last_routing.valid.sum(dim=1).float().mean())
        for moe in model.moe_layers().values()
    ]
    accuracy = float((out.logits.argmax(dim=1) == data["test"].labels).float().mean())
    return {
        "accuracy": accuracy,
        "loss": float(out.loss),
        "experts_per_token": per_layer,
        "k_max": [moe.top_k for moe in model.moe_layers().values()],
    }


def _mean_std(values: list[float]) -> tuple[float, float]:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), std


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    schedules = cfg["schedules"] or [s for s in SCHEDULE_ORDER if s in K_SCHEDULES]
    torch.set_num_threads(1)
    data = load_digits(seed=seed)
    seeds = [seed + i for i in range(cfg["seeds"])]
    runs = {s: [train_one(s, sd, cfg["steps"], data) for sd in seeds] for s in schedules}

    rows = [
        "| schedule | K_max per layer | test accuracy | test loss | experts/token "
        "| per layer | acc - uniform (paired) |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    for s in schedules:
        acc = _mean_std([r["accuracy"] for r in runs[s]])
        loss = _mean_std([r["loss"] for r in runs[s]])
        layers = [
            statistics.fmean(v)
            for v in zip(*(r["experts_per_token"] for r in runs[s]), strict=True)
        ]
        diffs = [
            a["accuracy"] - u["accuracy"] for a, u in zip(runs[s], runs["uniform"], strict=True)
        ]
        diff = _mean_std(diffs)
        summary[s] = {
            "accuracy": acc,
            "loss": loss,
            "experts_per_token": statistics.fmean(layers),
            "per_layer": layers,
            "diff_vs_uniform": diff,
            "wins_vs_uniform": sum(d > 0 for d in diffs),
        }
        rows.append(
            f"| {s} | {runs[s][0]['k_max']} | {acc[0]:.4f} ± {acc[1]:.4f} | "
            f"{loss[0]:.4f} ± {loss[1]:.4f} | {statistics.fmean(layers):.2f} | "
            f"{', '.join(f'{v:.2f}' for v in layers)} | "
            f"{diff[0]:+.4f} ± {diff[1]:.4f} ({summary[s]['wins_vs_uniform']}/{len(seeds)} wins) |"
        )
    return {
        "table": "\n".join(rows),
        "seeds": seeds,
        "steps": cfg["steps"],
        "summary": summary,
        "runs": runs,
    }
