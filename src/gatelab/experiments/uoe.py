"""Union of Experts: exact decomposition of dense MLPs, and routed slices vs top-k MoE.

Claims tested: "Union of Experts" (Yang et al., arXiv 2503.02495). (1) Splitting W1 by
columns and W2 by rows gives E experts whose sum is the dense MLP exactly. (2) Routing
over those slices (UoME) reaches a lower language-modelling loss than a top-k MoE at
fewer FLOPs (the paper: perplexity on average 2.38 lower than the best MoE at about 76%
of its FLOPs).

Protocol (ours):

- Exactness: gatelab's LM ``SwiGLU``, ``GluMlp`` with biases, ``Mlp`` (GELU, biases) and
  ``nn.Sequential(Linear, ReLU, Linear)``, D = 64, F = 256, random weights, decomposed
  into E = 2, 8, 32 experts and run as a gatelab MoE with every expert on at weight 1
  (:func:`gatelab.layers.decompose_to_moe`); max |MoE(x) - MLP(x)| over 512 random tokens
  in float64 and float32.
- Loss vs FLOPs: a byte-level LM on the shipped prose/code corpus (``load_corpus``):
  embedding D = 64, 2 pre-norm blocks of causal RoPE attention (4 heads) and an FFN, tied
  head; sequences of 64 bytes, batch 16, AdamW lr 3e-3, the same batches per seed. FFN
  arms, all with the same stored FFN weights (SwiGLU, total width 256):
  ``dense`` (one SwiGLU of width 256); ``uoe`` k = 1, 2, 4 (8 slices of width 32,
  :class:`gatelab.routing.UoERouter`: per-token top-k, weight 1 straight-through);
  ``topk`` k = 1, 2, 4 (the same 8 experts with a softmax top-k router whose combine
  weights are the gate probabilities, Switch/GShard style); ``uoe_patch`` k = 2
  (:class:`gatelab.routing.PatchSelectionRouter`, capacity factor 1). Every routed arm
  adds the Switch balance loss (0.01). Validation cross entropy (nats per byte) on the
  first 32 validation batches.
- FLOPs: forward FLOPs per token of the FFN layers only (2 per multiply-add):
  dense 2 * 3 * D * F per layer; routed 2 * 3 * D * (F / E) * (mean filled slots) + the
  router's 2 * D * E. Attention, norms and embeddings are the same in every arm and left
  out. The mean filled slots is measured on the validation batches (k for per-token
  top-k; fewer for patch selection, which drops tokens past capacity).
- Caveat: patch-wise selection picks tokens over the whole batch, so whether a token is
  taken depends on later tokens of the batch: in a causal LM that is a (small) leak.
"""

from __future__ import annotations

import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..convert import decompose_to_moe, uoe_mlp
from ..data.text import EOS, IGNORE_INDEX, EvalBatches, LMBatches, load_corpus
from ..layers import GluMlp, Mlp, MoE, apply_rope, rope_cache
from . import mean_pm_std
from ._loop import train_loop

NAME = "uoe"
DESCRIPTION = "Union of Experts: exact MLP decomposition; routed slices vs top-k MoE, loss vs FLOPs"

SCALES = {
    "smoke": {"steps": 3, "seeds": 1, "eval_batches": 2, "dim": 16, "hidden": 32},
    "full": {"steps": 400, "seeds": 2, "eval_batches": 32, "dim": 64, "hidden": 256},
}
NUM_EXPERTS, SEQ_LEN, BATCH = 8, 64, 16
ARMS = {
    "dense": None,
    "uoe k=1": ("uoe", 1),
    "uoe k=2": ("uoe", 2),
    "uoe k=4": ("uoe", 4),
    "topk k=1": ("topk", 1),
    "topk k=2": ("topk", 2),
    "topk k=4": ("topk", 4),
    "uoe_patch k=2": ("uoe_patch", 2),
}


# -- (1) exactness -------------------------------------------------------------------------


def _mlps(dim: int, hidden: int) -> dict[str, nn.Module]:
    return {
        "SwiGLU (LM)": GluMlp(dim, hidden),
        "GluMlp + bias": GluMlp(dim, hidden, bias=True),
        "Mlp (GELU) + bias": Mlp(dim, hidden),
        "Sequential (ReLU)": nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim)
        ),
    }


def exactness(dim: int, hidden: int, seed: int) -> list[dict]:
    rows = []
    for e in (2, 8, 32):
        if hidden % e:
            continue
        for name, mlp in _mlps(dim, hidden).items():
            row = {"mlp": name, "num_experts": e}
            for dtype in (torch.float64, torch.float32):
                torch.manual_seed(seed)
                for p in mlp.parameters():
                    nn.init.normal_(p, std=0.2)
                mlp = mlp.to(dtype)
                x = torch.randn(512, dim, dtype=dtype)
                with torch.no_grad():
                    err = (decompose_to_moe(mlp, e)(x) - mlp(x)).abs().max()
                row[str(dtype).removeprefix("torch.")] = float(err)
            rows.append(row)
    return rows


# -- (2) loss vs FLOPs ---------------------------------------------------------------------


class Block(nn.Module):
    def __init__(self, dim: int, ffn: nn.Module, heads: int = 4):
        super().__init__()
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim, bias=False)
        self.heads, self.ffn = heads, ffn

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        b, s, d = x.shape
        qkv = self.qkv(self.norm1(x)).view(b, s, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))
        return x + self.ffn(self.norm2(x))


class TinyLM(nn.Module):
    def __init__(self, dim: int, hidden: int, arm: tuple[str, int] | None, layers: int = 2):
        super().__init__()
        self.dim, self.hidden = dim, hidden
        self.embed = nn.Embedding(EOS + 1, dim)
        nn.init.normal_(self.embed.weight, std=0.02)  # tied head: small initial logits
        self.blocks = nn.ModuleList(Block(dim, _ffn(dim, hidden, arm)) for _ in range(layers))
        self.norm = nn.RMSNorm(dim)
        cos, sin = rope_cache(dim // 4, SEQ_LEN)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, self.cos, self.sin)
        return F.linear(self.norm(x), self.embed.weight)

    def moes(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if isinstance(b.ffn, MoE)]


def _ffn(dim: int, hidden: int, arm: tuple[str, int] | None) -> nn.Module:
    if arm is None:
        return GluMlp(dim, hidden)
    router, k = arm
    kwargs = {"loss_weights": {"balance": 0.01}}
    if router == "topk":
        return MoE(dim, hidden // NUM_EXPERTS, NUM_EXPERTS, k, router="topk", **kwargs)
    return uoe_mlp(dim, hidden, NUM_EXPERTS, k, router=router, **kwargs)


def ffn_flops(model: TinyLM, dim: int, hidden: int, slots: float) -> float:
    """Forward FFN FLOPs per token (2 per multiply-add), router included."""
    if not model.moes():
        return len(model.blocks) * 2 * 3 * dim * hidden
    per_expert = 2 * 3 * dim * (hidden // NUM_EXPERTS)
    return len(model.blocks) * (per_expert * slots + 2 * dim * NUM_EXPERTS)


def train_one(arm, seed: int, cfg: dict, corpus) -> dict:
    torch.manual_seed(seed)
    dim, hidden = cfg["dim"], cfg["hidden"]
    model = TinyLM(dim, hidden, arm)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    batches = LMBatches(corpus, "train", seq_len=SEQ_LEN, batch_size=BATCH, seed=seed)

    def loss_fn(model: TinyLM, batch) -> Tensor:
        logits = model(batch.inputs)
        loss = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())
        return loss + sum((m.aux_loss for m in model.moes()), torch.zeros(()))

    train_loop(model, loss_fn, batches, opt, steps=cfg["steps"])
    return evaluate(model, corpus, cfg["eval_batches"])


@torch.no_grad()
def evaluate(model: TinyLM, corpus, max_batches: int) -> dict:
    model.eval()
    total, count, slots, tokens = 0.0, 0, 0, 0
    for batch in EvalBatches(
        corpus, "val", seq_len=SEQ_LEN, batch_size=BATCH, max_batches=max_batches
    ):
        logits = model(batch.inputs)
        keep = batch.targets != IGNORE_INDEX
        total += float(F.cross_entropy(logits[keep], batch.targets[keep], reduction="sum"))
        count += int(keep.sum())
        for moe in model.moes():
            slots += int(moe.last_routing.valid.sum())
            tokens += moe.last_routing.experts.shape[0]
    mean_slots = slots / tokens if tokens else 0.0
    return {
        "val_loss": total / count,
        "mean_slots": mean_slots,
        "ffn_flops": ffn_flops(model, model.dim, model.hidden, mean_slots),
    }


def _fmt(values: list[float], digits: int = 4) -> str:
    return mean_pm_std(values, digits)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    cfg = SCALES[scale]
    exact = exactness(cfg["dim"], cfg["hidden"], seed)
    rows = [
        "| dense MLP | experts E | max abs error float64 | max abs error float32 |",
        "|---|---|---|---|",
    ]
    rows += [
        f"| {r['mlp']} | {r['num_experts']} | {r['float64']:.2e} | {r['float32']:.2e} |"
        for r in exact
    ]
    corpus = load_corpus()
    seeds = [seed + i for i in range(cfg["seeds"])]
    runs = {name: [train_one(arm, s, cfg, corpus) for s in seeds] for name, arm in ARMS.items()}
    dense_flops = runs["dense"][0]["ffn_flops"]
    rows += [
        "",
        "| FFN arm | filled slots / token | FFN FLOPs / token | vs dense | val loss (nats/byte) |",
        "|---|---|---|---|---|",
    ]
    for name, results in runs.items():
        flops = statistics.fmean(r["ffn_flops"] for r in results)
        slots = statistics.fmean(r["mean_slots"] for r in results)
        slot_text = "-" if name == "dense" else f"{slots:.2f}"
        rows.append(
            f"| {name} | {slot_text} | {flops:,.0f} | {flops / dense_flops:.3f} | "
            f"{_fmt([r['val_loss'] for r in results])} |"
        )
    return {
        "table": "\n".join(rows),
        "exactness": exact,
        "seeds": seeds,
        "steps": cfg["steps"],
        "runs": runs,
    }
