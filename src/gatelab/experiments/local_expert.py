"""Local expert + gate: customise a frozen LeNet-5 to simulated users' handwriting.

Claim tested ("A Mixture of Expert Approach for Low-Cost Customization of DNNs", arXiv
1811.00056): with a small local expert (LE) trained on a user's few samples and a gating
network (GN) choosing between it and the frozen global expert (GE), accuracy on the user's
data rises significantly with almost no loss on the generic data, for an overhead of about
2.5% of the GE's size.

Setup: scikit-learn's 8x8 digits (class-stratified split), upsampled bilinearly to 16x16.
GE: :class:`gatelab.models.LeNet5` (image_size 16, resized to 32x32 inside), trained on the
clean train split and frozen. Users: ``gatelab.data.distort.random_style(user)`` (slant,
stroke width, a per-user elastic field plus per-image jitter; documented in
:mod:`gatelab.data.distort`). Each user gives ``shots`` images per class from the train
split written in their style (the few samples); their test set is the whole test split in
their style (fresh jitter). The device also keeps ``shots`` clean images per class (the
generic samples the gate sees). Generic accuracy: the clean test split.

Arms per user: the GE alone ("before"); the LE + GN mixture, hard-routed, for LE / GN reading
pooled 8x8 pixels ("pixels") and reading the GE's F6 features ("global"); and, for context,
the whole GE fine-tuned on the user's samples ("finetune", what the paper avoids: it costs a
full retraining and changes the shared model). Size: LE + GN parameters over the GE's.
"""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..adapt.local_expert import LocalExpertMoE, train_local_expert
from ..data import load_digits
from ..data.distort import distort, random_style, upsample
from ..models import LeNet5, LeNet5Config
from ._loop import random_batches, train_loop

NAME = "local-expert"
DESCRIPTION = "frozen LeNet-5 + small local expert + gate on simulated users' handwriting"

SETTINGS = {
    "smoke": dict(ge_steps=20, le_steps=10, users=[1], shots=2, finetune_steps=5),
    "full": dict(
        ge_steps=1500, le_steps=400, users=[1, 2, 3, 4, 5, 6], shots=5, finetune_steps=200
    ),
}
SIZE = 16
ARMS = ("before", "pixels", "global", "finetune")


def _train_ge(x: Tensor, y: Tensor, steps: int, seed: int) -> LeNet5:
    torch.manual_seed(seed)
    model = LeNet5(LeNet5Config(image_size=SIZE))
    _fit(model, list(model.parameters()), x, y, steps, 2e-3, seed)
    return model.eval().requires_grad_(False)


def _fit(model, params, x, y, steps, lr, seed) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    loss_fn = lambda m, idx: F.cross_entropy(m(x[idx]).logits, y[idx])  # noqa: E731
    train_loop(model, loss_fn, random_batches(len(x), min(64, len(x)), gen), opt, steps=steps)
    model.eval()


@torch.no_grad()
def _acc(model, x: Tensor, y: Tensor) -> float:
    model.eval()
    return float((model(x).logits.argmax(-1) == y).float().mean())


def _shots(labels: Tensor, shots: int, seed: int) -> Tensor:
    """``shots`` indices per class, drawn with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for c in range(10):
        idx = torch.nonzero(labels == c).squeeze(1)
        picks.append(idx[torch.randperm(len(idx), generator=gen)[:shots]])
    return torch.cat(picks)


def run_user(ge: LeNet5, data: dict, user: int, s: dict, seed: int) -> dict[str, dict]:
    style = random_style(user)
    train_x, train_y = data["train_x"], data["train_y"]
    pick = _shots(train_y, s["shots"], seed=1000 + user)
    user_x, user_y = distort(train_x[pick], style, seed=user), train_y[pick]
    generic = _shots(train_y, s["shots"], seed=2000 + user)
    test_user = distort(data["test_x"], style, seed=10_000 + user)
    evals = {"user": (test_user, data["test_y"]), "generic": (data["test_x"], data["test_y"])}
    out = {"before": {k: _acc(ge, *v) for k, v in evals.items()}}
    for source in ("pixels", "global"):
        torch.manual_seed(seed + user)
        moe = LocalExpertMoE(
            ge,
            source=source,
            hidden_dim=16 if source == "pixels" else 0,
            gate_hidden_dim=4 if source == "pixels" else 0,
        )
        before = {k: v.clone() for k, v in ge.state_dict().items()}
        train_local_expert(
            moe,
            user_x,
            user_y,
            train_x[generic],
            train_y[generic],
            steps=s["le_steps"],
            gate_steps=s["le_steps"],
            seed=seed + user,
        )
        if any(not torch.equal(v, before[k]) for k, v in ge.state_dict().items()):
            raise RuntimeError("the global expert changed while training the local expert")
        row = {k: _acc(moe, *v) for k, v in evals.items()}
        with torch.no_grad():
            row["to_local_user"] = float(moe(test_user).route_local.float().mean())
            row["to_local_generic"] = float(moe(data["test_x"]).route_local.float().mean())
            local = moe.local_expert(moe.local_input(test_user, moe._global(test_user)[1]))
            row["local_alone_user"] = float((local.argmax(-1) == data["test_y"]).float().mean())
        row["added"], row["share"] = moe.added_parameters(), moe.added_share()
        out[source] = row
    tuned = copy.deepcopy(ge).requires_grad_(True)
    _fit(tuned, list(tuned.parameters()), user_x, user_y, s["finetune_steps"], 1e-3, seed + user)
    out["finetune"] = {k: _acc(tuned, *v) for k, v in evals.items()}
    out["finetune"]["added"] = sum(p.numel() for p in tuned.parameters())
    return out


def run(scale: str = "full", seed: int = 0, out_dir: str | Path | None = None) -> dict:
    s = SETTINGS[scale]
    digits = load_digits(seed=0)
    data = {
        "train_x": upsample(digits["train"].images, SIZE),
        "train_y": digits["train"].labels,
        "test_x": upsample(digits["test"].images, SIZE),
        "test_y": digits["test"].labels,
    }
    ge = _train_ge(data["train_x"], data["train_y"], s["ge_steps"], seed)
    per_user = {u: run_user(ge, data, u, s, seed) for u in s["users"]}
    summary = {}
    for arm in ARMS:
        rows = [r[arm] for r in per_user.values()]
        summary[arm] = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
    return {
        "table": _table(summary, per_user, ge.num_active_parameters()),
        "summary": summary,
        "per_user": {str(u): r for u, r in per_user.items()},
        "global_parameters": ge.num_active_parameters(),
    }


def _table(summary: dict, per_user: dict, ge_params: int) -> str:
    n = len(per_user)
    lines = [
        f"| arm | user acc (mean of {n} users) | generic acc | added params (share of GE) | "
        "user inputs to LE | generic inputs to LE |",
        "|---|---|---|---|---|---|",
    ]
    for arm, r in summary.items():
        if arm in ("pixels", "global"):
            size = f"{r['added']:.0f} ({100 * r['share']:.2f}%)"
            routed = f"{r['to_local_user']:.3f} | {r['to_local_generic']:.3f}"
        elif arm == "finetune":
            size, routed = f"{r['added']:.0f} retrained (a copy of the GE)", "- | -"
        else:
            size, routed = "0", "- | -"
        lines.append(f"| {arm} | {r['user']:.4f} | {r['generic']:.4f} | {size} | {routed} |")
    lines.append("")
    lines.append(f"GE (LeNet-5) parameters used by its forward: {ge_params}. Per user, user acc:")
    lines.append("")
    lines.append("| user | " + " | ".join(ARMS) + " | LE alone (pixels) | LE alone (global) |")
    lines.append("|---|" + "---|" * (len(ARMS) + 2))
    for u, r in per_user.items():
        cells = [f"{r[a]['user']:.3f}" for a in ARMS]
        cells += [f"{r[a]['local_alone_user']:.3f}" for a in ("pixels", "global")]
        lines.append(f"| {u} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
