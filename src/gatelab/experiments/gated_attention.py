"""Gated attention (G1) vs plain attention on the byte-corpus LM: loss, attention sink, activations.

Claim ("Gated Attention for Large Language Models", Qiu et al., arXiv 2505.06708): a sigmoid
gate on each head's SDPA output, computed from the block input, lowers the loss, removes the
attention sink (the share of attention on the first token) and the massive activations
(the largest |hidden state| in the residual stream).

Setup: the dense-lm recipe's model narrowed to train in a few minutes on 2 CPU cores
(4 layers, width 128, 4 heads, SwiGLU FFN 512, sequences of 64 bytes, 450 steps), trained
from the same seed on the same batches with ``attn_gate`` "none" (the LM's usual attention) and
"elementwise" (the paper's best variant). The gate adds dim * dim parameters per layer;
the table gives both counts (the paper does not match them either; it checks that more
parameters alone do not explain the gain).

Measured on validation windows (the first ``eval_batches`` batches of each domain):

- ``val_loss``: mean cross entropy in nats per byte over both domains' targets;
- ``first_token_share``: the mean attention probability on key position 0 over layers,
  heads and queries 1..S-1 (query 0 can only attend to itself and is left out), from
  explicit softmax probabilities; ``max_head_share``: the same for the one (layer, head)
  with the largest share, since a sink can live in a few heads only;
- ``max_activation``: max |h| over the residual stream (every block's output);
- ``gate_mean``: the mean gate score sigmoid(x W_theta) (the paper: about 0.12, sparse).

Every training and validation window starts with a BOS token (the corpus's end-of-document
id, 257th symbol) followed by the window's first S - 1 bytes, as LLM training sequences
start with one; the sink the paper measures is attention on that first token. The table
also gives the share a uniform causal attention would put on position 0 (the mean of
1 / (q + 1) over queries q = 1..S-1), the level below which there is no sink.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data.text import DOMAINS, EOS, IGNORE_INDEX, EvalBatches, LMBatch, LMBatches, load_corpus
from ..models import LM, LMConfig
from ..train.schedule import WarmupCosine
from ..train.trainer import param_groups
from ._loop import train_loop

NAME = "gated-attention"
DESCRIPTION = "G1 elementwise-gated vs plain attention LM: val loss, attention sink, max activation"

SETTINGS = {
    "smoke": dict(
        dim=32,
        num_layers=2,
        num_heads=2,
        ffn_hidden_dim=64,
        seq_len=32,
        batch_size=4,
        steps=4,
        eval_batches=1,
        lr=1e-3,
        seeds=[0],
    ),
    "full": dict(
        dim=128,
        num_layers=4,
        num_heads=4,
        ffn_hidden_dim=512,
        seq_len=64,
        batch_size=16,
        steps=450,
        eval_batches=4,
        lr=2e-3,
        seeds=[0],
    ),
}
GATES = ("none", "elementwise")


def _config(s: dict, gate: str) -> LMConfig:
    return LMConfig(
        vocab_size=257,
        dim=s["dim"],
        num_layers=s["num_layers"],
        num_heads=s["num_heads"],
        max_seq_len=s["seq_len"],
        moe_layers="none",
        ffn_hidden_dim=s["ffn_hidden_dim"],
        attn_gate=gate,
    )


def with_bos(batch: LMBatch) -> LMBatch:
    """The window shifted right by one behind a BOS token (EOS id): inputs [BOS, x0..x_{S-2}],
    targets [x0..x_{S-1}]; the same length, so every model sees BOS at position 0."""
    bos = torch.full_like(batch.inputs[:, :1], EOS)
    return LMBatch(
        torch.cat([bos, batch.inputs[:, :-1]], dim=1),
        torch.cat([batch.inputs[:, :1], batch.targets[:, :-1]], dim=1),
        torch.cat([batch.domains[:, :1], batch.domains[:, :-1]], dim=1),
    )


class BosBatches:
    """LMBatches with :func:`with_bos` applied to every batch."""

    def __init__(self, batches: LMBatches):
        self.batches = batches

    def __iter__(self):
        return self

    def __next__(self) -> LMBatch:
        return with_bos(next(self.batches))


def train_lm(model: LM, batches, steps: int, lr: float) -> float:
    """AdamW (weight decay 0.1 on matrices), 10% warm-up + cosine, clip 1; returns seconds."""
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
    schedule = WarmupCosine(opt, warmup_steps=max(1, steps // 10), total_steps=steps)
    start = time.perf_counter()
    loss_fn = lambda m, b: m(b.inputs, b.targets).loss  # noqa: E731
    train_loop(model, loss_fn, batches, opt, steps=steps, schedule=schedule, clip=1.0)
    return time.perf_counter() - start


class _Probe:
    """Forward hooks that record the sink share, the largest activation and the gate mean."""

    def __init__(self, model: LM):
        self.sink, self.gates = [], []
        self.max_act, self.max_head = 0.0, 0.0
        self.handles = []
        for block in model.blocks:
            self.handles.append(block.attn.register_forward_pre_hook(self._attention))
            self.handles.append(block.register_forward_hook(self._residual))

    def _attention(self, module: nn.Module, args) -> None:
        x, cos, sin = args[:3]
        probs = module.attention_weights(x, cos, sin)
        gate = module.gate_scores(x)
        if gate is not None:
            self.gates.append(float(gate.float().mean()))
        per_head = probs[:, :, 1:, 0].mean(dim=(0, 2))
        self.sink.append(float(per_head.mean()))
        self.max_head = max(self.max_head, float(per_head.max()))

    def _residual(self, module: nn.Module, args, output: Tensor) -> None:
        self.max_act = max(self.max_act, float(output.abs().max()))

    def close(self) -> dict[str, float]:
        for h in self.handles:
            h.remove()
        return {
            "first_token_share": sum(self.sink) / len(self.sink),
            "max_head_share": self.max_head,
            "max_activation": self.max_act,
            "gate_mean": sum(self.gates) / len(self.gates) if self.gates else None,
        }


@torch.no_grad()
def _evaluate(model: LM, corpus, s: dict) -> dict[str, float]:
    model.eval()
    probe = _Probe(model)
    nats, count = 0.0, 0
    for domain in DOMAINS:
        for batch in EvalBatches(
            corpus,
            "val",
            seq_len=s["seq_len"],
            batch_size=s["batch_size"],
            domain=domain,
            max_batches=s["eval_batches"],
        ):
            batch = with_bos(batch)
            logits = model(batch.inputs).logits
            nats += float(
                F.cross_entropy(
                    logits.flatten(0, 1),
                    batch.targets.flatten(),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            count += int((batch.targets != IGNORE_INDEX).sum())
    return {"val_loss": nats / count, **probe.close()}


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    s = SETTINGS[scale]
    corpus = load_corpus(seed=0)
    rows = []
    for run_seed in [seed + k for k in s["seeds"]]:
        for gate in GATES:
            torch.manual_seed(run_seed)
            model = LM(_config(s, gate))
            batches = BosBatches(
                LMBatches(
                    corpus,
                    "train",
                    seq_len=s["seq_len"],
                    batch_size=s["batch_size"],
                    seed=run_seed,
                )
            )
            seconds = train_lm(model, batches, s["steps"], s["lr"])
            rows.append(
                {
                    "gate": gate,
                    "seed": run_seed,
                    "params": model.num_parameters(),
                    "train_seconds": round(seconds, 1),
                    **_evaluate(model, corpus, s),
                }
            )
    uniform = sum(1 / (q + 1) for q in range(1, s["seq_len"])) / (s["seq_len"] - 1)
    return {"table": _table(rows, uniform), "rows": rows, "uniform_share": uniform, "settings": s}


def _table(rows: list[dict], uniform: float) -> str:
    lines = [
        "| attention | seed | params | val loss (nats/byte) | first-token share "
        f"(uniform: {uniform:.3f}) | max head share | max abs activation | mean gate |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        gate = "" if r["gate_mean"] is None else f"{r['gate_mean']:.3f}"
        lines.append(
            f"| {r['gate']} | {r['seed']} | {r['params']:,} | {r['val_loss']:.4f} | "
            f"{r['first_token_share']:.3f} | {r['max_head_share']:.3f} | "
            f"{r['max_activation']:.1f} | {gate} |"
        )
    return "\n".join(lines)
