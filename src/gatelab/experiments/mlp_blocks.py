"""MLP blocks on digits at matched parameter counts: plain MLP, GLU variants, Scaling-MLPs
bottleneck, and hourglass (wide-narrow-wide, with a trained or a fixed random lift).

Claims tested:

- "Scaling MLPs: A Tale of Inductive Bias" (arXiv 2306.13575): the inverted-bottleneck
  residual MLP (pre-LN, x + W2 GELU(W1 LN(x)), expansion 4) trains better than a standard
  stacked MLP of the same size.
- "GLU Variants Improve Transformer" (arXiv 2002.05202): GLU FFNs (SwiGLU, GeGLU, ReGLU,
  bilinear) beat the plain GELU/ReLU FFN at matched parameters (shown there for T5).
- "Hourglass MLPs" (arXiv 2510.01796): at a matched budget, wide-narrow-wide blocks (residual
  at the wide d_z, narrow d_h) beat conventional narrow-wide-narrow ones, and the lift W_in
  can stay at its random initialisation.

Setup: scikit-learn's 8x8 digits (gatelab.data.load_digits: train / val / test split by
class), inputs flattened to 64. Every model is lift -> ``num_blocks`` blocks -> readout
(the plain MLP: ``num_blocks + 1`` Linear+GELU layers, no residual, no norm). For each
budget the width is searched so the trainable parameter count is the closest to it (a
fixed lift is a buffer, so the fixed-lift hourglass spends its budget on wider blocks).
Widths: GLU blocks hidden = 4 * dim * 2/3 (Shazeer's matched width); bottleneck hidden =
4 * dim; hourglass hidden = dim / 4, with dim >= 64 (the lift must widen the input: a
budget too small for that skips the hourglass rows, and the table says so). AdamW (lr 3e-3, weight decay 0.01), batch 64, cosine
schedule with warm-up, the same steps for every model; test accuracy at the end (no early
stopping), mean and standard deviation over seeds.

LM part ("Hourglass FFN in Transformer LMs", arXiv 2602.06471): the byte-corpus LM (4
layers, 4 heads, sequences of 64) with its SwiGLU FFN (width 128, hidden 512) against the
LM whose every FFN is K = 2 stacked hourglass blocks of hidden d_model / 2, whose d_model is
widened until the total parameter count matches (the paper spends the FFN's savings on
d_model or attention). Same seed, batches and schedule (AdamW lr 2e-3, 250 steps); one
seed. Validation bits per byte per domain (gatelab.train.evaluate.bits_per_byte).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import load_digits
from ..data.text import DOMAINS, EvalBatches, LMBatches, load_corpus
from ..layers import BottleneckMLP, GluMlp, HourglassMLP
from ..models import LM, LMConfig
from ..train.evaluate import bits_per_byte
from ..train.schedule import WarmupCosine
from ._loop import random_batches, train_loop
from .gated_attention import train_lm

NAME = "mlp-blocks"
DESCRIPTION = "digits at matched params: plain MLP vs GLU variants vs bottleneck vs hourglass"

SETTINGS = {
    "smoke": dict(budgets=[3000, 10000], num_blocks=2, steps=20, seeds=[0]),
    "full": dict(budgets=[5000, 15000, 40000], num_blocks=4, steps=500, seeds=[0, 1, 2]),
}
LM_SETTINGS = {
    "smoke": dict(
        dim=16,
        num_layers=1,
        num_heads=2,
        seq_len=16,
        batch_size=2,
        steps=2,
        eval_batches=1,
        lr=1e-3,
        hourglass_blocks=2,
    ),
    "full": dict(
        dim=128,
        num_layers=4,
        num_heads=4,
        seq_len=64,
        batch_size=16,
        steps=250,
        eval_batches=4,
        lr=2e-3,
        hourglass_blocks=2,
    ),
}
INPUT, CLASSES = 64, 10


class _GluResidual(nn.Module):
    """x + GluMlp(LN(x)): the bottleneck block with a GLU MLP in place of the GELU MLP."""

    def __init__(self, dim: int, variant: str):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = GluMlp(dim, round(4 * dim * 2 / 3), variant=variant, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.mlp(self.norm(x))


def _glu_model(variant: str) -> Callable[[int, int], nn.Module]:
    def build(dim: int, num_blocks: int) -> nn.Module:
        blocks = [_GluResidual(dim, variant) for _ in range(num_blocks)]
        return nn.Sequential(nn.Flatten(), nn.Linear(INPUT, dim), *blocks, nn.Linear(dim, CLASSES))

    return build


def _plain_model(width: int, num_blocks: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    for i in range(num_blocks + 1):
        layers += [nn.Linear(INPUT if i == 0 else width, width), nn.GELU()]
    layers.append(nn.Linear(width, CLASSES))
    return nn.Sequential(*layers)


# name -> (what it is, builder(width, num_blocks))
MODELS: dict[str, tuple[str, Callable[[int, int], nn.Module]]] = {
    "plain": ("stacked Linear+GELU (StandardMLP), no residual", _plain_model),
    "bottleneck": (
        "Scaling-MLPs block, hidden 4d (conventional narrow-wide-narrow)",
        lambda d, n: BottleneckMLP(INPUT, d, n, CLASSES),
    ),
    **{
        v: (f"residual {v} block, hidden 8d/3", _glu_model(v))
        for v in ("swiglu", "geglu", "reglu", "bilinear")
    },
    "hourglass": (
        "hourglass, residual at d, hidden d/4, trained lift",
        lambda d, n: HourglassMLP(INPUT, d, n, CLASSES, hidden_dim=max(1, d // 4)),
    ),
    "hourglass_fixed": (
        "hourglass, hidden d/4, fixed random lift",
        lambda d, n: HourglassMLP(INPUT, d, n, CLASSES, hidden_dim=max(1, d // 4), fixed_lift=True),
    ),
}


# The hourglass lifts the 64 inputs to a wider residual stream (its premise; HourglassMLP
# refuses a narrower one), so its width search starts at the input width, and a budget too
# small for it skips the hourglass rows instead of shrinking the stream (issue 15).
MIN_WIDTH = {"hourglass": INPUT, "hourglass_fixed": INPUT}
OVER_BUDGET = 1.05  # the smallest allowed model may exceed the budget by this much


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def matched_width(
    build: Callable[[int, int], nn.Module], num_blocks: int, budget: int, min_width: int = 4
) -> int | None:
    """The width (>= ``min_width``) whose model's trainable parameter count is closest to
    ``budget``; None when even ``min_width`` exceeds the budget by more than 5%."""
    count = lambda w: _count(build(w, num_blocks))  # noqa: E731
    if count(min_width) > OVER_BUDGET * budget:
        return None
    hi = max(8, min_width)
    while count(hi) < budget:  # grow first: building a needlessly wide model is slow
        hi *= 2
    lo = max(min_width, hi // 2)
    while lo < hi:  # smallest width with count >= budget (counts grow with width)
        mid = (lo + hi) // 2
        if count(mid) >= budget:
            hi = mid
        else:
            lo = mid + 1
    return min((max(min_width, lo - 1), lo), key=lambda w: abs(count(w) - budget))


def _train_eval(model: nn.Module, data: dict, steps: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    x, y = data["train"].images, data["train"].labels
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = WarmupCosine(opt, warmup_steps=max(1, steps // 20), total_steps=steps)
    loss_fn = lambda m, idx: F.cross_entropy(m(x[idx]), y[idx])  # noqa: E731
    train_loop(model, loss_fn, random_batches(len(x), 64, gen), opt, steps=steps, schedule=schedule)
    model.eval()
    with torch.no_grad():
        test = data["test"]
        return float((model(test.images).argmax(-1) == test.labels).float().mean())


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    s = SETTINGS[scale]
    rows, skipped = digit_rows(s, seed)
    lm_rows = _lm_rows(LM_SETTINGS[scale], seed)
    table = _table(rows, skipped) + "\n\n" + _lm_table(lm_rows)
    return {"table": table, "rows": rows, "skipped": skipped, "lm_rows": lm_rows, "settings": s}


def digit_rows(s: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """The digits comparison: one row per budget and model, and the (budget, model) pairs
    skipped because the model's smallest allowed width exceeds the budget."""
    data = load_digits(seed=0)
    rows, skipped = [], []
    for budget in s["budgets"]:
        for name, (what, build) in MODELS.items():
            least = MIN_WIDTH.get(name, 4)
            width = matched_width(build, s["num_blocks"], budget, least)
            if width is None:
                smallest = _count(build(least, s["num_blocks"]))
                skipped.append(
                    {"budget": budget, "model": name, "least": least, "params": smallest}
                )
                continue
            accs, start = [], time.perf_counter()
            for k in s["seeds"]:
                torch.manual_seed(seed + k)
                model = build(width, s["num_blocks"])
                accs.append(_train_eval(model, data, s["steps"], seed + k))
            rows.append(
                {
                    "budget": budget,
                    "model": name,
                    "what": what,
                    "width": width,
                    "params": _count(build(width, s["num_blocks"])),
                    "test_acc": accs,
                    "mean": statistics.mean(accs),
                    "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                    "seconds": round(time.perf_counter() - start, 1),
                }
            )
    return rows, skipped


# -- LM: hourglass FFN vs SwiGLU FFN ------------------------------------------------------


def _lm_config(s: dict, hourglass: bool, dim: int) -> LMConfig:
    ffn = (
        {
            "ffn": "hourglass",
            "ffn_hidden_dim": dim // 2,
            "ffn_kwargs": {"num_blocks": s["hourglass_blocks"]},
        }
        if hourglass
        else {"ffn_hidden_dim": 4 * dim}
    )
    return LMConfig(
        vocab_size=257,
        dim=dim,
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
        max_seq_len=s["seq_len"],
        moe_layers="none",
        **ffn,
    )


def _hourglass_dim(s: dict) -> int:
    """The model width (a multiple of 2 * num_heads) whose hourglass LM has the parameter
    count closest to the SwiGLU LM's: the paper spends the FFN's savings on d_model."""
    target = LM(_lm_config(s, False, s["dim"])).num_parameters()
    step = 2 * s["num_heads"]
    dims = range(step, 4 * s["dim"], step)
    return min(dims, key=lambda d: abs(LM(_lm_config(s, True, d)).num_parameters() - target))


def _lm_rows(s: dict, seed: int) -> list[dict]:
    corpus = load_corpus(seed=0)
    rows = []
    for hourglass, dim in ((False, s["dim"]), (True, _hourglass_dim(s))):
        torch.manual_seed(seed)
        model = LM(_lm_config(s, hourglass, dim))
        batches = LMBatches(
            corpus, "train", seq_len=s["seq_len"], batch_size=s["batch_size"], seed=seed
        )
        seconds = train_lm(model, batches, s["steps"], s["lr"])
        evals = (
            batch
            for domain in DOMAINS
            for batch in EvalBatches(
                corpus,
                "val",
                seq_len=s["seq_len"],
                batch_size=s["batch_size"],
                domain=domain,
                max_batches=s["eval_batches"],
            )
        )
        bpb = bits_per_byte(model, evals)
        rows.append(
            {
                "ffn": "hourglass" if hourglass else "swiglu",
                "dim": dim,
                "ffn_hidden_dim": model.config.ffn_hidden_dim,
                "params": model.num_parameters(),
                "train_seconds": round(seconds, 1),
                **{f"bpb_{d}": bpb[d]["bits_per_byte"] for d in DOMAINS},
            }
        )
    return rows


def _lm_table(rows: list[dict]) -> str:
    lines = [
        "| LM FFN | d_model | FFN hidden | params | "
        + " | ".join(f"val bits/byte {d}" for d in DOMAINS)
        + " |",
        "|---|---|---|---|" + "---|" * len(DOMAINS),
    ]
    for r in rows:
        bpb = " | ".join(f"{r[f'bpb_{d}']:.3f}" for d in DOMAINS)
        lines.append(
            f"| {r['ffn']} | {r['dim']} | {r['ffn_hidden_dim']} | {r['params']:,} | {bpb} |"
        )
    return "\n".join(lines)


def _table(rows: list[dict], skipped: list[dict]) -> str:
    lines = [
        "| budget | model | width d | trainable params | test accuracy (mean ± sd) | block |",
        "|---|---|---|---|---|---|",
    ]
    for budget in dict.fromkeys(r["budget"] for r in [*rows, *skipped]):
        for r in rows:
            if r["budget"] == budget:
                lines.append(
                    f"| {budget:,} | {r['model']} | {r['width']} | {r['params']:,} | "
                    f"{100 * r['mean']:.2f} ± {100 * r['std']:.2f} % | {r['what']} |"
                )
        for r in skipped:
            if r["budget"] == budget:
                lines.append(
                    f"| {budget:,} | {r['model']} | - | - | skipped: its narrowest residual "
                    f"stream (d = {r['least']}, the input width) has {r['params']:,} "
                    "parameters | - |"
                )
    return "\n".join(lines)
