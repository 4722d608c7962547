"""Dopamine mode specialisation: a frozen MLP foundation specialised to rotated digits.

Claim tested ("Dopamine: Brain Modes, Not Brains", arXiv 2602.11726): on a small MLP
pretrained on a 50/50 mixture of upright and 45-degree-rotated digits and then frozen,
learning only a per-neuron threshold and gain (a few hundred parameters per layer) improves
accuracy on the rotated mode over the frozen baseline, with partial activation sparsity;
LoRA reaches higher accuracy with more trainable parameters.

Setup: scikit-learn's 8x8 digits (gatelab.data.load_digits, class-stratified split;
MNIST does not ship), rotated by ``gatelab.data.rotate`` (bilinear, zeros outside).
Foundation: 64 -> 128 -> 128 -> 10 ReLU MLP, trained on the train split with a seeded random
half of the images rotated by 45 degrees (the 50/50 mix), AdamW. Specialisation on the whole
train split rotated, the same steps and batch for every arm:

- frozen: the foundation as it is;
- dopamine: :class:`gatelab.adapt.dopamine.Dopamine` on both hidden ReLUs, T annealed
  1.0 -> 0.05, evaluated with the hardened step gate (also reported: the smooth gate at the
  final T);
- lora: ``gatelab.adapt.lora.add_lora`` (rank 4, alpha 8) on both hidden layers and the head;
- head: only the last Linear retrained (a common cheap baseline; not in the paper).

Reported per arm: trainable parameters (and per layer for Dopamine), rotated and upright test
accuracy (mean and sd over seeds; each seed pretrains its own foundation), and for the
frozen model the share of ReLU units that are nonzero, for Dopamine the share of hidden
units whose hard gate fires on a nonzero activation, on the rotated test set.
"""

from __future__ import annotations

import statistics
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..adapt.dopamine import Dopamine, activation_fraction, temperature_at
from ..adapt.lora import add_lora, lora_parameters
from ..data import load_digits, rotate
from ._loop import random_batches, train_loop

NAME = "dopamine"
DESCRIPTION = "frozen digits MLP specialised to 45-degree rotation: Dopamine gates vs LoRA"

SETTINGS = {
    "smoke": dict(hidden=32, pretrain_steps=30, adapt_steps=20, seeds=[0]),
    "full": dict(hidden=128, pretrain_steps=2000, adapt_steps=1500, seeds=[0, 1, 2, 3, 4]),
}
ANGLE = 45.0
SITES = ["act1", "act2"]
LORA_RANK, LORA_ALPHA = 4, 8.0


def foundation(hidden: int) -> nn.Sequential:
    """The 64 -> hidden -> hidden -> 10 ReLU MLP, with named layers."""
    layers = OrderedDict(
        flat=nn.Flatten(),
        fc1=nn.Linear(64, hidden),
        act1=nn.ReLU(),
        fc2=nn.Linear(hidden, hidden),
        act2=nn.ReLU(),
        head=nn.Linear(hidden, 10),
    )
    return nn.Sequential(layers)


def fit(
    model: nn.Module,
    params: list[nn.Parameter],
    x: Tensor,
    y: Tensor,
    steps: int,
    lr: float,
    seed: int,
    on_step: Callable[[int], None] | None = None,
) -> None:
    """AdamW without weight decay (it would pull the gains towards 0), batch 64, constant lr."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    train_loop(
        model,
        lambda m, idx: F.cross_entropy(m(x[idx]), y[idx]),
        random_batches(len(x), 64, gen),
        opt,
        steps=steps,
        before_step=on_step,
    )
    model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).argmax(-1) == y).float().mean())


def _data(seed: int) -> dict[str, Tensor]:
    data = load_digits(seed=0)
    train, test = data["train"], data["test"]
    gen = torch.Generator().manual_seed(seed)
    half = torch.rand(len(train.images), generator=gen) < 0.5
    mixed = torch.where(half[:, None, None, None], rotate(train.images, ANGLE), train.images)
    return {
        "mix_x": mixed,
        "train_y": train.labels,
        "rot_x": rotate(train.images, ANGLE),
        "test_rot": rotate(test.images, ANGLE),
        "test_up": test.images,
        "test_y": test.labels,
    }


def _evaluate(model: nn.Module, d: dict[str, Tensor]) -> dict[str, float]:
    return {
        "rotated": accuracy(model, d["test_rot"], d["test_y"]),
        "upright": accuracy(model, d["test_up"], d["test_y"]),
    }


def run_seed(s: dict, seed: int) -> dict[str, dict]:
    d = _data(seed)
    torch.manual_seed(seed)
    base = foundation(s["hidden"])
    fit(base, list(base.parameters()), d["mix_x"], d["train_y"], s["pretrain_steps"], 3e-3, seed)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    out = {"frozen": {**_evaluate(base, d), "trainable": 0}}
    out["frozen"]["active"] = statistics.fmean(
        activation_fraction(base, d["test_rot"], SITES).values()
    )
    steps = s["adapt_steps"]

    def fresh() -> nn.Sequential:
        model = foundation(s["hidden"])
        model.load_state_dict(state)
        return model

    torch.manual_seed(seed)
    dopa = Dopamine(fresh(), d["test_up"][:2], sites=SITES, temperature=1.0)
    fit(
        dopa,
        dopa.gate_parameters(),
        d["rot_x"],
        d["train_y"],
        steps,
        1e-2,
        seed + 100,
        on_step=lambda t: dopa.set_temperature(temperature_at(t, steps, 1.0, 0.05)),
    )
    out["dopamine"] = {**_evaluate(dopa, d), "trainable": sum(dopa.trainable_parameters().values())}
    out["dopamine"]["per_layer"] = dopa.trainable_parameters()
    out["dopamine"]["active"] = statistics.fmean(dopa.open_fraction(d["test_rot"]).values())
    dopa.set_hard(False)
    out["dopamine"]["rotated_smooth"] = accuracy(dopa, d["test_rot"], d["test_y"])
    dopa.set_hard(None)

    torch.manual_seed(seed)
    lora = fresh()
    add_lora(lora, ["fc1", "fc2", "head"], rank=LORA_RANK, alpha=LORA_ALPHA)
    params = lora_parameters(lora)
    fit(lora, params, d["rot_x"], d["train_y"], steps, 3e-3, seed + 100)
    out["lora"] = {**_evaluate(lora, d), "trainable": sum(p.numel() for p in params)}

    head = fresh().requires_grad_(False)
    head.head.requires_grad_(True)
    params = list(head.head.parameters())
    fit(head, params, d["rot_x"], d["train_y"], steps, 3e-3, seed + 100)
    out["head"] = {**_evaluate(head, d), "trainable": sum(p.numel() for p in params)}
    # The frozen part must not have moved: the gates and adapters are all that trained.
    for name, model in (("dopamine", dopa.base), ("head", head)):
        for key, value in model.state_dict().items():
            if not key.startswith("head") or name == "dopamine":
                if not torch.equal(value, state[key]):
                    raise RuntimeError(f"{name}: the frozen {key} changed during adaptation")
    return out


def _stat(runs: list[dict], key: str) -> tuple[float, float]:
    values = [r[key] for r in runs]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    s = SETTINGS[scale]
    per_seed = [run_seed(s, seed + k) for k in s["seeds"]]
    arms = list(per_seed[0])
    summary = {}
    for arm in arms:
        runs = [r[arm] for r in per_seed]
        summary[arm] = {
            "trainable": runs[0]["trainable"],
            "rotated": _stat(runs, "rotated"),
            "upright": _stat(runs, "upright"),
            "rotated_per_seed": [r["rotated"] for r in runs],
        }
        if "active" in runs[0]:
            summary[arm]["active"] = _stat(runs, "active")
    smooth = _stat([r["dopamine"] for r in per_seed], "rotated_smooth")
    per_layer = per_seed[0]["dopamine"]["per_layer"]
    # Paired by seed (each seed has its own foundation): the gain over the frozen model.
    gains = {
        arm: [r[arm]["rotated"] - r["frozen"]["rotated"] for r in per_seed]
        for arm in arms
        if arm != "frozen"
    }
    return {
        "table": _table(summary, smooth, per_layer, len(per_seed), gains),
        "gains_over_frozen": gains,
        "summary": summary,
        "dopamine_per_layer": per_layer,
        "dopamine_rotated_smooth": smooth,
    }


def _table(summary: dict, smooth: tuple, per_layer: dict, seeds: int, gains: dict) -> str:
    lines = [
        f"| arm | trainable params | rotated acc (mean ± sd, {seeds} seeds) | upright acc | "
        "units active on rotated |",
        "|---|---:|---|---|---|",
    ]
    for arm, r in summary.items():
        active = f"{r['active'][0]:.3f}" if "active" in r else "-"
        lines.append(
            f"| {arm} | {r['trainable']} | {r['rotated'][0]:.4f} ± {r['rotated'][1]:.4f} | "
            f"{r['upright'][0]:.4f} ± {r['upright'][1]:.4f} | {active} |"
        )
    layers = ", ".join(f"{k}: {v}" for k, v in per_layer.items())
    lines.append("")
    lines.append(
        f"Dopamine trainable parameters per layer: {layers}. Dopamine evaluated with the smooth "
        f"gate at the final T instead of the step: rotated {smooth[0]:.4f} ± {smooth[1]:.4f}."
    )
    lines.append("")
    lines.append("Rotated accuracy minus the frozen model's, per seed (paired):")
    lines.append("")
    for arm, values in gains.items():
        wins = sum(v > 0 for v in values)
        per = ", ".join(f"{v:+.4f}" for v in values)
        lines.append(f"- {arm}: {per} (better on {wins} of {len(values)} seeds)")
    return "\n".join(lines)
