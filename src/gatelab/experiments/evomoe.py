"""EvoMoE (dense phase -> diversify -> dense-to-sparse gate) against Switch top-1 and top-2.

Claim tested: "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via
Dense-To-Sparse Gate" (Nie et al., arXiv 2112.14397) reports that training one expert
first, spawning diverse experts from it and then routing with the DTS gate (dense at
first, sparser as the Gumbel temperature falls) beats Switch and other fixed sparse gates
on GPT language modelling at equal training tokens (the notes found no numbers, only the
direction).

Protocol (ours; the paper's scale is far out of reach on 2 CPU cores):

- Data: the ``moe-lm`` recipe's two-domain byte corpus (prose and code), the same batches
  in the same order for every arm; validation bits per byte per domain
  (``gatelab.train.evaluate.bits_per_byte``) on the first ``eval_batches`` batches of
  each domain's validation stream.
- Model: the ``moe-lm`` recipe's LM shrunk to fit (``SCALES``): width 128, 2 layers, 4
  SwiGLU experts of width 256 per layer, sequence 64, batch 16; balance 0.01 and z 0.001
  losses; AdamW with the recipe's lr 1e-3, warm-up and cosine, one schedule over all steps.
- Arms, each ``steps`` optimizer steps (equal training tokens):
  ``switch``: ``topk`` top-1, weight = softmax probability (Switch Transformer);
  ``top2``: ``topk`` top-2 with renormalised weights (the recipe's router);
  ``evomoe``: a dense LM whose FFN is one expert (width 256) for ``dense_steps``, then
  :func:`gatelab.adapt.upcycle_lm` (4 copies, router ~ N(0, 0.02)) with
  :func:`gatelab.adapt.diversify_experts` (each expert keeps half its hidden units,
  rescaled), then the ``dense_to_sparse`` gate: tau linear 2.0 -> 0.5 (the released WMT
  script's values) over ``decay_steps``, hard top-1 from ``hard_from``, threshold 0.001,
  combine weights softmax(logits). The learning-rate schedule continues across the switch,
  and so do AdamW's moments (:func:`gatelab.adapt.upcycle_optimizer_state`: each expert
  starts from its dense FFN's moments; the new routers start with none).
- Ablation (``train_arm("dts", ...)``, not in the default run, to stay within its time):
  ``dts``: the same DTS gate and schedule on randomly initialised experts from step 0,
  without the dense phase and the diversify step.
- Reported: bits per byte on validation per domain (every model evaluated in eval mode:
  the DTS gate routes top-1, like Switch), mean training loss over the last 50 steps,
  mean routed experts per token over training (the dense phase counts one expert), and
  wall time. For EvoMoE also the validation loss just before and after the upcycle, which
  measures what diversifying costs.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..convert import upcycle_lm, upcycle_optimizer_state
from ..layers import MoE
from ..recipes import load_recipe
from ..recipes.run import build_run
from ..train import Trainer, read_jsonl

NAME = "evomoe"
DESCRIPTION = "EvoMoE (dense -> diversify -> DTS gate) vs Switch top-1 and top-2 at equal tokens"

SCALES: dict[str, dict[str, Any]] = {
    "smoke": {
        "dim": 32,
        "layers": 1,
        "heads": 2,
        "hidden": 32,
        "seq": 16,
        "batch": 4,
        "steps": 8,
        "dense_steps": 2,
        "decay_steps": 3,
        "hard_from": 6,
        "warmup": 2,
        "eval_batches": 2,
        "seeds": [0],
    },
    "full": {
        "dim": 128,
        "layers": 2,
        "heads": 4,
        "hidden": 256,
        "seq": 64,
        "batch": 16,
        "steps": 400,
        "dense_steps": 100,
        "decay_steps": 150,
        "hard_from": 250,
        "warmup": 40,
        "eval_batches": 24,
        "seeds": [0],
    },
}
NUM_EXPERTS = 4
DIVERSIFY = 0.5
ARMS = ("switch", "top2", "evomoe")


MOE_KEYS = ("top_k", "router", "router_kwargs")  # the arms' keys of [model.moe]


def recipe(scale: dict[str, Any], seed: int, run_dir: Path, **model: Any) -> dict[str, Any]:
    """The moe-lm recipe, shrunk to ``scale``, with ``model`` overrides."""
    r = load_recipe("moe-lm")
    r["name"] = f"evomoe-{run_dir.name}"
    r["model"].update(
        dim=scale["dim"],
        num_layers=scale["layers"],
        num_heads=scale["heads"],
        max_seq_len=scale["seq"],
        ffn_hidden_dim=scale["hidden"],
    )
    moe = {k: model.pop(k) for k in list(model) if k in MOE_KEYS}
    r["model"]["moe"].update(num_experts=NUM_EXPERTS, hidden_dim=scale["hidden"], **moe)
    r["model"].update(model)
    r["data"].update(
        seq_len=scale["seq"],
        batch_size=scale["batch"],
        seed=seed,
        eval_batches=scale["eval_batches"],
    )
    r["train"].update(
        steps=scale["steps"],
        warmup_steps=scale["warmup"],
        seed=seed,
        run_dir=str(run_dir),
        eval_every=0,
        save_every=0,
        routing_every=0,
        log_every=1,
        progress=False,
        verbose=False,
    )
    return r


class ExpertCounter:
    """Mean routed experts per token over the training forwards of every MoE layer."""

    def __init__(self):
        self.slots = self.tokens = 0
        self._handles: list = []

    def attach(self, model: nn.Module) -> ExpertCounter:
        for m in model.modules():
            if isinstance(m, MoE):
                self._handles.append(m.register_forward_hook(self._hook))
        return self

    def _hook(self, module: MoE, args, output) -> None:
        if module.training and module.last_routing is not None:
            routing = module.last_routing
            self.slots += int(routing.valid.sum())
            self.tokens += routing.num_tokens

    def add_dense(self, tokens: int) -> None:
        """Forwards through a dense FFN: one expert per token."""
        self.slots += tokens
        self.tokens += tokens

    def remove(self) -> None:
        for h in self._handles:
            h.remove()

    @property
    def mean(self) -> float:
        return self.slots / self.tokens if self.tokens else float("nan")


def train_arm(arm: str, scale: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
    """Train one arm from scratch; its validation bits per byte and training statistics."""
    torch.manual_seed(seed)
    if arm == "evomoe":
        return _train_evomoe(scale, seed, out_dir)
    model = {
        "switch": {"top_k": 1, "router_kwargs": {}},
        "top2": {"top_k": 2},
        "dts": {
            "top_k": NUM_EXPERTS,
            "router": "dense_to_sparse",
            "router_kwargs": dts_kwargs(scale),
        },
    }[arm]
    run = build_run(recipe(scale, seed, out_dir / f"{arm}-{seed}", **model))
    counter = ExpertCounter().attach(run.model)
    result = run.trainer().fit()
    counter.remove()
    return _summary(result, counter, out_dir / f"{arm}-{seed}", scale)


def dts_kwargs(scale: dict[str, Any]) -> dict[str, Any]:
    """The DTS gate's settings: tau 2.0 -> 0.5 linearly from the end of the dense phase
    over ``decay_steps`` (steps count from the start of the run), hard top-1 from
    ``hard_from``, threshold 0.001."""
    tau = {
        "kind": "linear",
        "start": 2.0,
        "end": 0.5,
        "steps": scale["decay_steps"],
        "begin": scale["dense_steps"],
    }
    return {"tau": tau, "hard_from": scale["hard_from"], "threshold": 1e-3}


def _train_evomoe(scale: dict[str, Any], seed: int, out_dir: Path) -> dict[str, Any]:
    dense_dir, sparse_dir = out_dir / f"evomoe-dense-{seed}", out_dir / f"evomoe-{seed}"
    run = build_run(recipe(scale, seed, dense_dir, moe_layers="none"))
    dense_cfg = copy.copy(run.train_config)
    dense_cfg.steps = scale["dense_steps"]
    # The dense phase is the first dense_steps of the full run's lr schedule.
    dense = Trainer(run.model, run.data, dense_cfg, eval_fn=run.eval_fn, forward=run.forward)
    dense.scheduler.total_steps = scale["steps"]
    dense.scheduler._apply()
    dense_result = dense.fit()
    counter = ExpertCounter()
    counter.add_dense(scale["dense_steps"] * scale["batch"] * scale["seq"] * scale["layers"])

    start = scale["dense_steps"]
    moe_lm = upcycle_lm(
        run.model,
        NUM_EXPERTS,
        top_k=NUM_EXPERTS,
        router="dense_to_sparse",
        router_kwargs=dts_kwargs(scale),
        diversify=DIVERSIFY,
        seed=seed,
    )
    after = _bpb(run.eval_fn(moe_lm))
    for block in moe_lm.blocks:
        block.ffn.router.eval_mode = "dense"
    after_dense = _bpb(run.eval_fn(moe_lm))
    for block in moe_lm.blocks:
        block.ffn.router.eval_mode = "top1"

    sparse_cfg = copy.copy(run.train_config)
    sparse_cfg.run_dir = str(sparse_dir)
    trainer = Trainer(moe_lm, run.data, sparse_cfg, eval_fn=run.eval_fn, forward=run.forward)
    _continue_schedule(trainer, start)
    upcycle_optimizer_state(run.model, dense.optimizer, moe_lm, trainer.optimizer)
    counter.attach(moe_lm)
    result = trainer.fit()
    counter.remove()
    summary = _summary(result, counter, sparse_dir, scale, earlier=dense_dir)
    summary["seconds"] += dense_result.elapsed_s
    summary["seed"] = seed
    summary["upcycle"] = {
        "dense_before": _bpb(dense_result.eval),
        "after_top1": after,
        "after_dense_mix": after_dense,
    }
    return summary


def _continue_schedule(trainer: Trainer, step: int) -> None:
    """Start ``trainer`` at optimizer step ``step`` of its lr schedule (and of the routers'
    schedules, which read the trainer's step), as one continuous run would be."""
    trainer.step = step
    trainer.scheduler.last_step = step
    trainer.scheduler._apply()


def _bpb(metrics: dict[str, float] | None) -> dict[str, float]:
    return {k.removeprefix("bpb_"): v for k, v in (metrics or {}).items()}


def _summary(result, counter: ExpertCounter, run_dir: Path, scale, earlier=None) -> dict:
    losses = [r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl", "train")]
    if earlier is not None:
        losses = [r["loss"] for r in read_jsonl(earlier / "metrics.jsonl", "train")] + losses
    if len(losses) != scale["steps"]:
        raise RuntimeError(f"expected {scale['steps']} logged steps, found {len(losses)}")
    tail = losses[-min(50, len(losses)) :]
    return {
        "bpb": _bpb(result.eval),
        "train_loss_tail": statistics.fmean(tail),
        "experts_per_token": counter.mean,
        "seconds": result.elapsed_s,
    }


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = "runs/experiments/evomoe"):
    settings = SCALES[scale]
    out = Path(out_dir)
    results: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    for s in settings["seeds"]:
        for arm in ARMS:
            results[arm].append(train_arm(arm, settings, seed + s, out))
    return {"table": _table(results, settings), "results": results, "settings": settings}


def _mean(rows: list[dict], *keys: str) -> float:
    """The mean over seeds of ``row[keys[0]][keys[1]]...``."""
    values = []
    for row in rows:
        for key in keys:
            row = row[key]
        values.append(row)
    return statistics.fmean(values)


def _table(results: dict[str, list[dict]], settings: dict[str, Any]) -> str:
    lines = [
        "| arm | bpb prose | bpb code | train loss (last 50 steps, nats) | "
        "experts/token in training | time (s) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, rows in results.items():
        prose, code = _mean(rows, "bpb", "prose"), _mean(rows, "bpb", "code")
        loss, experts = _mean(rows, "train_loss_tail"), _mean(rows, "experts_per_token")
        lines.append(
            f"| {arm} | {prose:.4f} | {code:.4f} | {loss:.4f} | {experts:.2f} | "
            f"{_mean(rows, 'seconds'):.0f} |"
        )
    up = results["evomoe"][0]["upcycle"]
    lines += [
        "",
        f"EvoMoE upcycle at step {settings['dense_steps']} (seed {results['evomoe'][0]['seed']}): "
        f"dense model bpb prose/code {up['dense_before']['prose']:.4f}/"
        f"{up['dense_before']['code']:.4f}; after diversify, top-1 routing "
        f"{up['after_top1']['prose']:.4f}/{up['after_top1']['code']:.4f}, softmax mix of all "
        f"experts {up['after_dense_mix']['prose']:.4f}/{up['after_dense_mix']['code']:.4f}.",
    ]
    return "\n".join(lines)


__all__ = ["ARMS", "DESCRIPTION", "NAME", "SCALES", "run", "train_arm"]
