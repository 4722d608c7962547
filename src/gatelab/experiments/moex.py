"""MoE-X vs top-k routing at equal active parameters: activation sparsity and loss.

Claim tested: "Mixture of Experts Made Intrinsically Interpretable" (Yang et al., ICML
2025, arXiv 2503.07639): ReLU experts and a router that prefers the experts whose
activation is sparsest give sparser hidden activations than a standard MoE at about the
same loss (their chess model: val loss 0.211 for MoE-X vs 0.212 for Switch and 0.213 for
GPT-2 with GELU), and the router's score correlates negatively with the experts' L0.

Protocol (ours):

- Data: scikit-learn's 8x8 digits (``gatelab.data.load_digits``), test split reported.
- Model: ``gatelab.models.MLPClassifier``, a dense layer 64 -> 64 then two residual MoE
  layers of width 64, each 8 plain experts of width 32, top-2, Switch balance loss 0.01:
  every arm has the same stored and active parameters (the MoE-X router has none of its
  own; the top-k router's 8 x 64 weights are the only difference).
- Arms: ``topk-gelu`` (a Switch-style MoE with GELU experts), ``topk-relu`` (ReLU experts
  alone, the paper's ablation), ``moex`` (ReLU experts and the sparsity-aware router,
  :class:`gatelab.routing.SparsityAwareRouter`).
- Training: AdamW (lr 3e-3, weight decay 0.01), batch 64, the same batches per seed.
- Measured on the test set in eval mode, through the exact wide-MLP form of each MoE layer
  (:func:`gatelab.layers.moe_to_wide`, :func:`gatelab.layers.routing_mask`): L0 per token
  = the number of non-zero hidden units among the E * F units of the layer (so only the
  routed experts' units can count), averaged over tokens and the MoE layers, and as a
  fraction of the k * F routed units; test cross entropy and accuracy; and, per token and
  layer, the Spearman correlation across the E experts between the router's score and each
  expert's actual L0 on that token (every expert run, for the measurement only).
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import torch
from torch import Tensor

from ..convert import moe_to_wide
from ..data import load_digits
from ..layers import routing_mask
from ..models import MLPClassifier, MLPConfig, MoEConfig
from . import mean_pm_std
from .dynamoe import fit_on_digits

NAME = "moex"
DESCRIPTION = "MoE-X (ReLU experts, sparsity-aware router) vs top-k: activation L0 and loss, digits"

SCALES = {"smoke": {"steps": 8, "seeds": 1}, "full": {"steps": 600, "seeds": 4}}
ARMS = {
    "topk-gelu": {"router": "topk", "act": "gelu"},
    "topk-relu": {"router": "topk", "act": "relu"},
    "moex": {"router": "moex", "act": "relu"},
}


def model_config(router: str, act: str) -> MLPConfig:
    return MLPConfig(
        input_dim=64,
        hidden_dims=[64, 64, 64],
        num_classes=10,
        act=act,
        moe_layers=[1, 2],
        moe=MoEConfig(
            num_experts=8,
            top_k=2,
            hidden_dim=32,
            router=router,
            loss_weights={"balance": 0.01},
        ),
    )


def _ranks(values: Tensor) -> Tensor:
    """Ranks along the last axis (ties broken by position; fine for a summary statistic)."""
    return values.argsort(dim=-1).argsort(dim=-1).double()


def spearman_rows(a: Tensor, b: Tensor) -> Tensor:
    """Spearman correlation of each row of a with the same row of b ([N, E] -> [N]);
    rows where either side is constant are left out."""
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    den = (ra.norm(dim=-1) * rb.norm(dim=-1)).clamp_min(1e-12)
    keep = (a.std(-1) > 0) & (b.std(-1) > 0)
    return ((ra * rb).sum(-1) / den)[keep]


@torch.no_grad()
def measure(model: MLPClassifier, x: Tensor) -> dict:
    """L0 of the routed hidden units per token, and score-vs-L0 correlation, per MoE layer."""
    inputs = {}
    hooks = [
        moe.register_forward_pre_hook(lambda m, args, name=name: inputs.__setitem__(name, args[0]))
        for name, moe in model.moe_layers().items()
    ]
    try:
        model(x)
    finally:
        for hook in hooks:
            hook.remove()
    l0, fraction, rho = [], [], []
    for name, moe in model.moe_layers().items():
        wide = moe_to_wide(moe)
        h_in, routing = inputs[name].reshape(-1, moe.dim), moe.last_routing
        active = wide.hidden(h_in, routing_mask(routing, moe.hidden_dim)) != 0
        per_token = active.sum(dim=1).double()
        l0.append(float(per_token.mean()))
        fraction.append(float((per_token / (routing.valid.sum(1) * moe.hidden_dim)).mean()))
        unmasked = wide.hidden(h_in) != 0
        expert_l0 = unmasked.unflatten(1, (moe.num_experts, moe.hidden_dim)).sum(-1).double()
        # GELU units are (almost) never exactly 0, so every expert's L0 can be F and the
        # rank correlation undefined: None then (JSON has no NaN), reported as n/a.
        value = float(spearman_rows(routing.scores.double(), expert_l0).mean())
        rho.append(value if math.isfinite(value) else None)
    return {"l0": l0, "fraction": fraction, "score_l0_spearman": rho}


def train_one(arm: str, seed: int, steps: int, data) -> dict:
    torch.manual_seed(seed)
    model = MLPClassifier(model_config(**ARMS[arm]))
    fit_on_digits(model, data, steps, seed, cosine=False)
    x_test, y_test = data["test"].images.flatten(1), data["test"].labels
    with torch.no_grad():
        out = model(x_test, y_test)
    return {
        "loss": float(out.loss),
        "accuracy": float((out.logits.argmax(1) == y_test).float().mean()),
        "active_parameters": model.num_active_parameters(),
        **measure(model, x_test),
    }


def _fmt(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if v is not None]  # drop undefined correlations
    return mean_pm_std(values, digits) if values else "n/a"


def _nanmean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.fmean(kept) if kept else None


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    data = load_digits(seed=seed)
    seeds = [seed + i for i in range(cfg["seeds"])]
    runs = {arm: [train_one(arm, s, cfg["steps"], data) for s in seeds] for arm in ARMS}
    rows = [
        "| arm | active params | test loss | test accuracy | L0 per token per layer "
        "| L0 / (k F) | Spearman(score, expert L0) |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, results in runs.items():
        l0 = [statistics.fmean(r["l0"]) for r in results]
        frac = [statistics.fmean(r["fraction"]) for r in results]
        rho = [_nanmean(r["score_l0_spearman"]) for r in results]
        rows.append(
            f"| {arm} | {results[0]['active_parameters']} | "
            f"{_fmt([r['loss'] for r in results], 4)} | "
            f"{_fmt([r['accuracy'] for r in results], 4)} | {_fmt(l0, 1)} | {_fmt(frac)} | "
            f"{_fmt(rho)} |"
        )
    return {"table": "\n".join(rows), "seeds": seeds, "steps": cfg["steps"], "runs": runs}
