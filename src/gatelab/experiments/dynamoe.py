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
- Training: AdamW (lr 3e-3 decayed to 0 by a cosine, weight decay 0.01), batch 64, the
  same batches and the same initialisation for every schedule within a seed (the layers'
  K_max does not change the parameter shapes).
- Reported: test accuracy and cross entropy (mean and standard deviation over seeds), the
  measured experts per token on the test set (eval mode, so the routers' running
  thresholds) overall and per MoE layer, and the paired per-seed accuracy difference of
  each schedule against uniform.

A short LM run (full scale only) checks the language-modelling side (the paper: the best
schedule depends on model size; descending for its smallest model): ``gatelab.models.LM``
with 4 MoE layers (width 64, 4 heads, 8 SwiGLU experts of width 128, the same
``dynamic_k`` router, K_max between 1 and 4), trained on the byte corpus (sequences of 64,
batch 16, AdamW 2e-3 with a cosine) for uniform, descending and ascending, one seed;
reported: validation bits per byte on prose and on code (the first 4 batches of each) and
the experts per token.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
from torch import nn

from ..data import EvalBatches, LMBatches, load_corpus, load_digits
from ..models import LM, LMConfig, MLPClassifier, MLPConfig, MoEConfig
from ..routing import K_SCHEDULES
from ..train.evaluate import bits_per_byte
from . import mean_std
from ._loop import random_batches, train_loop

NAME = "dynamoe"
DESCRIPTION = "DynaMoE K_max schedules (uniform, descending, ...) with dynamic-k routing on digits"

SCALES = {
    "smoke": {"steps": 8, "seeds": 1, "schedules": ["uniform", "descending"], "lm_steps": 2},
    # schedules None: every schedule
    "full": {"steps": 400, "seeds": 6, "schedules": None, "lm_steps": 300},
}
LM_SCHEDULES = ["uniform", "descending", "ascending"]
SCHEDULE_ORDER = ["uniform", "descending", "ascending", "pyramid", "valley", "wave"]


def model_config(schedule: str) -> MLPConfig:
    return MLPConfig(
        input_dim=64,
        hidden_dims=[64, 64, 64, 64, 64],
        num_classes=10,
        act="gelu",
        moe_layers=[1, 2, 3, 4],
        moe=MoEConfig(
            num_experts=8,
            top_k=4,
            hidden_dim=32,
            router="dynamic_k",
            router_kwargs={"percentile": 0.75},
            k_schedule=schedule,
            k_schedule_min=1,
            loss_weights={"balance": 0.01},
        ),
    )


def fit_on_digits(model: nn.Module, data, steps: int, seed: int, cosine: bool) -> None:
    """AdamW (lr 3e-3, weight decay 0.01) on the model's total loss (task + aux) over
    batches of 64 training digits drawn by ``seed``, with cosine decay if ``cosine``; the
    model is left in eval mode."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps) if cosine else None
    x_train, y_train = data["train"].images.flatten(1), data["train"].labels
    gen = torch.Generator().manual_seed(seed)
    train_loop(
        model,
        lambda m, idx: m(x_train[idx], y_train[idx]).total_loss,
        random_batches(len(y_train), 64, gen),
        opt,
        steps=steps,
        schedule=decay,
    )
    model.eval()


def train_one(schedule: str, seed: int, steps: int, data) -> dict:
    """Train one model; return its test metrics and measured experts per token."""
    torch.manual_seed(seed)
    model = MLPClassifier(model_config(schedule))
    fit_on_digits(model, data, steps, seed, cosine=True)
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


def lm_config(schedule: str) -> LMConfig:
    return LMConfig(
        vocab_size=257,
        dim=64,
        num_layers=4,
        num_heads=4,
        max_seq_len=64,
        moe=MoEConfig(
            num_experts=8,
            top_k=4,
            hidden_dim=128,
            router="dynamic_k",
            router_kwargs={"percentile": 0.75},
            k_schedule=schedule,
        ),
    )


def train_lm(schedule: str, seed: int, steps: int, corpus) -> dict:
    """Train the small LM; return validation bits per byte by domain and experts per token."""
    torch.manual_seed(seed)
    model = LM(lm_config(schedule))
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.1)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    batches = LMBatches(corpus, "train", seq_len=64, batch_size=16, seed=seed)
    train_loop(
        model,
        lambda m, b: m(b.inputs, b.targets).total_loss,
        batches,
        opt,
        steps=steps,
        schedule=decay,
        clip=1.0,
    )
    result = {"k_max": [moe.top_k for moe in model.moe_layers().values()]}
    for domain in ("prose", "code"):
        evals = EvalBatches(corpus, "val", seq_len=64, batch_size=16, domain=domain, max_batches=4)
        with torch.no_grad():
            result[domain] = bits_per_byte(model, evals)[domain]["bits_per_byte"]
        result[f"{domain}_experts_per_token"] = statistics.fmean(
            float(moe.last_routing.valid.sum(dim=1).float().mean())
            for moe in model.moe_layers().values()
        )
    return result


def _lm_table(runs: dict) -> str:
    rows = [
        "| LM schedule | K_max per layer | val bits/byte prose | val bits/byte code "
        "| experts/token (prose, code) |",
        "|---|---|---|---|---|",
    ]
    for s, r in runs.items():
        rows.append(
            f"| {s} | {r['k_max']} | {r['prose']:.4f} | {r['code']:.4f} | "
            f"{r['prose_experts_per_token']:.2f}, {r['code_experts_per_token']:.2f} |"
        )
    return "\n".join(rows)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    schedules = cfg["schedules"] or [s for s in SCHEDULE_ORDER if s in K_SCHEDULES]
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
        acc = mean_std([r["accuracy"] for r in runs[s]])
        loss = mean_std([r["loss"] for r in runs[s]])
        layers = [
            statistics.fmean(v)
            for v in zip(*(r["experts_per_token"] for r in runs[s]), strict=True)
        ]
        diffs = [
            a["accuracy"] - u["accuracy"] for a, u in zip(runs[s], runs["uniform"], strict=True)
        ]
        diff = mean_std(diffs)
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
    table = "\n".join(rows)
    lm_runs = {}
    if cfg["lm_steps"]:
        corpus = load_corpus(seed=seed)
        lm_runs = {s: train_lm(s, seed, cfg["lm_steps"], corpus) for s in LM_SCHEDULES}
        table += "\n\n" + _lm_table(lm_runs)
    return {
        "table": table,
        "seeds": seeds,
        "steps": cfg["steps"],
        "summary": summary,
        "runs": runs,
        "lm_steps": cfg["lm_steps"],
        "lm_runs": lm_runs,
    }
