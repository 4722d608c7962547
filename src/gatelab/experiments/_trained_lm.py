"""A small two-domain (prose/code) MoE LM, trained once and cached, for the edit experiments.

:func:`trained_moe_lm` trains the ``moe-lm`` recipe's model (4 layers, 8 SwiGLU experts,
top-2, ``topk`` router with renormalised weights, balance + z losses), narrowed so it trains
in a few minutes on 2 CPU cores, on **domain-balanced batches**: half of every batch is
prose, half code. The shipped corpus is 9% prose by bytes, and the demo saw only weak domain
specialisation with the natural mix (docs/results.md); balancing gives both domains the
same training signal, so experts have a reason to serve one of them. The choice is the
experiment's, not the recipe's; it is recorded in the cached run's ``lm.json``.

The run goes through ``gatelab.recipes.run.build_run`` and the Trainer, so its
``out_dir/<name>/`` is an ordinary gatelab run directory (``gatelab eval``/``info`` and
the edit commands read it). A second call with the same settings loads the final
checkpoint instead of training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.text import DOMAINS, LMBatch, LMBatches, load_corpus

# Per scale: overrides of the moe-lm recipe. "full" trains in about 7 minutes on 2 cores.
SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {
        "dim": 32,
        "expert_hidden_dim": 32,
        "num_heads": 2,
        "seq_len": 32,
        "batch_size": 4,
        "steps": 3,
    },
    "full": {
        "dim": 128,
        "expert_hidden_dim": 256,
        "num_heads": 4,
        "seq_len": 128,
        "batch_size": 16,
        "steps": 450,
    },
}


class BalancedBatches:
    """Batches whose first half is prose and second half code (resumable)."""

    def __init__(self, corpus, seq_len: int, batch_size: int, seed: int):
        if batch_size < 2 or batch_size % 2:
            raise ValueError(f"batch_size must be even and >= 2, got {batch_size}")
        half = batch_size // 2
        self.parts = [
            LMBatches(
                corpus, "train", seq_len=seq_len, batch_size=half, seed=seed + i, domain=domain
            )
            for i, domain in enumerate(DOMAINS)
        ]

    def __iter__(self):
        return self

    def __next__(self) -> LMBatch:
        batches = [next(part) for part in self.parts]
        return LMBatch(*(torch.cat(fields) for fields in zip(*batches, strict=True)))

    def state_dict(self) -> dict:
        return {domain: p.state_dict() for domain, p in zip(DOMAINS, self.parts, strict=True)}

    def load_state_dict(self, state: dict) -> None:
        for domain, part in zip(DOMAINS, self.parts, strict=True):
            part.load_state_dict(state[domain])


@dataclass
class TrainedLM:
    model: nn.Module
    run_dir: Path
    recipe: dict[str, Any]
    seq_len: int
    train_seconds: float | None  # None when loaded from the cache


def recipe_for(scale: str, seed: int, run_dir: Path) -> dict[str, Any]:
    from ..recipes import load_recipe

    s = SETTINGS[scale]
    overrides = [
        f"model.dim={s['dim']}",
        f"model.moe.hidden_dim={s['expert_hidden_dim']}",
        f"model.num_heads={s['num_heads']}",
        f"model.max_seq_len={s['seq_len']}",
        f"model.ffn_hidden_dim={2 * s['expert_hidden_dim']}",
        f"data.seq_len={s['seq_len']}",
        f"data.batch_size={s['batch_size']}",
        f"data.seed={seed}",
        "data.eval_batches=2",
        f"train.steps={s['steps']}",
        f"train.warmup_steps={max(1, s['steps'] // 20)}",
        f"train.seed={seed}",
        f"train.eval_every={s['steps']}",
        f"train.save_every={s['steps']}",
        f"train.run_dir='{run_dir.as_posix()}'",
    ]
    return load_recipe("moe-lm", overrides)


def trained_moe_lm(scale: str, seed: int, out_dir: str | Path, name: str = "lm") -> TrainedLM:
    """The two-domain MoE LM for ``scale``, trained under ``out_dir/<name>`` or loaded."""
    import time

    from ..recipes.run import build_run
    from ..train.checkpoint import latest_checkpoint, load_checkpoint, read_checkpoint

    run_dir = Path(out_dir) / f"{name}-{scale}-seed{seed}"
    recipe = recipe_for(scale, seed, run_dir)
    settings = SETTINGS[scale]
    run = build_run(recipe)
    ckpt_dir = run_dir / "checkpoints"
    found = latest_checkpoint(ckpt_dir) if ckpt_dir.is_dir() else None
    if found is not None and read_checkpoint(found)[0]["step"] == settings["steps"]:
        load_checkpoint(found, run.model, rng=False)
        return TrainedLM(run.model.eval(), run_dir, recipe, settings["seq_len"], None)
    corpus = load_corpus(seed=recipe["data"]["seed"])
    run.data = BalancedBatches(corpus, settings["seq_len"], settings["batch_size"], seed)
    start = time.perf_counter()
    run.trainer().fit(resume=found is not None)
    seconds = time.perf_counter() - start
    (run_dir / "lm.json").write_text(
        json.dumps(
            {
                "recipe": recipe,
                "settings": settings,
                "data": "domain-balanced batches (half prose, half code)",
                "train_seconds": round(seconds, 1),
            },
            indent=1,
        )
    )
    return TrainedLM(run.model.eval(), run_dir, recipe, settings["seq_len"], seconds)


def domain_windows(
    domain: str, seq_len: int, count: int, split: str = "val", seed: int = 0
) -> torch.Tensor:
    """``count`` windows [count, seq_len + 1] of ``domain`` text, evenly spaced over the
    split's stream (so they come from many documents): inputs ``w[:, :-1]``, targets
    ``w[:, 1:]``."""
    ids, _ = load_corpus(seed=seed).stream(split, domain)
    room = ids.numel() - (seq_len + 1)
    if room < count:
        raise ValueError(f"the {split} {domain} text is too short for {count} windows")
    starts = torch.linspace(0, room, count).long()
    return ids[starts[:, None] + torch.arange(seq_len + 1)].long()


__all__ = ["SETTINGS", "BalancedBatches", "TrainedLM", "domain_windows", "trained_moe_lm"]
