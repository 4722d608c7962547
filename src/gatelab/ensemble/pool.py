"""A pool of whole models (members), each with a cost profile measured on this machine.

The experts of MoE² (arXiv 2501.09410) and the members of NSED are whole models of different
costs. A :class:`Member` is one trained classifier in eval mode with its parameter count,
its multiply-adds per query (counted from the architecture by :func:`count_flops`) and its
latency per query measured here (:func:`measure_latency`: the median of repeated batch-1
forwards). :class:`MemberPool` stacks the members' log-probabilities and costs.

:func:`digits_pool` trains a heterogeneous pool on scikit-learn digits through gatelab's
recipes (``digits-dense`` / ``digits-moe`` with overrides, and LeNet-5): MLPs of different
widths and depths, an MoE MLP, LeNet-5, and two specialists trained on half of the classes
each, so that a gate has something to learn.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import TensorBatches, load_digits
from ..layers.moe import MoE
from ..recipes import build_run, load_recipe

__all__ = [
    "LogitsOnly",
    "Member",
    "MemberPool",
    "count_flops",
    "digits_pool",
    "measure_latency",
    "member_specs",
]


class LogitsOnly(nn.Module):
    """A gatelab classifier (which returns a ModelOutput) as a module x -> logits [N, C]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, x: Tensor) -> Tensor:
        out = self.inner(x)
        return getattr(out, "logits", out)


@dataclass
class Member:
    """One whole model of the pool.

    ``model``: eval mode, maps x [N, ...] to class logits [N, C]. ``params``: its parameter
    count. ``flops``: multiply-adds of one query (:func:`count_flops`). ``latency_s``: the
    measured seconds per query at batch 1 (median of repeats). ``batch_latency_s``: measured
    seconds per query when queries come in batches of 32 (the median batch time / 32); 0 if
    not measured. ``classes``: the classes it was trained on (None: all).
    """

    name: str
    model: nn.Module
    params: int
    flops: int
    latency_s: float
    batch_latency_s: float = 0.0
    classes: list[int] | None = field(default=None)

    @torch.no_grad()
    def log_probs(self, x: Tensor) -> Tensor:
        """x [N, ...] -> [N, C] log-softmax of the member's logits (no grad)."""
        return torch.log_softmax(self.model(x).float(), dim=-1)


@dataclass
class MemberPool:
    """Members in a fixed order; member i is index i of every stacked tensor."""

    members: list[Member]

    def __post_init__(self):
        if not self.members:
            raise ValueError("MemberPool needs at least one member; pass members=[Member(...)]")
        names = [m.name for m in self.members]
        if len(set(names)) != len(names):
            raise ValueError(f"members: names must be unique, got {names}")

    def __len__(self) -> int:
        return len(self.members)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.members]

    @torch.no_grad()
    def log_probs(self, x: Tensor) -> Tensor:
        """x [N, ...] -> [M, N, C]: every member's log-probabilities."""
        return torch.stack([m.log_probs(x) for m in self.members])

    def costs(self) -> dict[str, Tensor]:
        """ "latency_s", "batch_latency_s", "flops", "params": float64 tensors [M] each."""
        keys = ("latency_s", "batch_latency_s", "flops", "params")
        return {
            k: torch.tensor([float(getattr(m, k)) for m in self.members], dtype=torch.float64)
            for k in keys
        }


@torch.no_grad()
def measure_latency(model: nn.Module, example: Tensor, repeats: int = 20) -> float:
    """Median wall-clock seconds of ``model(example)`` over ``repeats`` runs (after two
    warm-up runs), no grad. ``example`` is one query [1, ...] for the batch-1 latency."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(2):
        model(example)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(example)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@torch.no_grad()
def count_flops(model: nn.Module, example: Tensor) -> int:
    """Multiply-adds of ``model(example)`` per example, counted from the architecture.

    nn.Linear: in * out per row; nn.Conv2d: output elements * in/groups * kernel area;
    a gatelab MoE layer: its router (dim * experts) plus top_k experts' weight elements per
    token (only the chosen experts run). Element-wise ops, pooling and biases are not
    counted (they are a few percent of these models' work). LeNet-5's C3 is counted dense
    (its Table I mask zeroes weights but PyTorch still multiplies them).
    """
    total, handles, inside_moe = [0], [], set()
    for module in model.modules():
        if isinstance(module, MoE):
            inside_moe.update(id(m) for m in module.modules())
    for module in model.modules():
        if isinstance(module, MoE):
            handles.append(module.register_forward_hook(_moe_hook(module, total)))
        elif id(module) in inside_moe:
            continue
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(_linear_hook(total)))
        elif isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(_conv_hook(total)))
    try:
        model(example)
    finally:
        for handle in handles:
            handle.remove()
    return total[0] // max(1, example.shape[0])


def _linear_hook(total: list[int]):
    def hook(module: nn.Linear, inputs, output):
        total[0] += (
            inputs[0].numel() // module.in_features * module.in_features * module.out_features
        )

    return hook


def _conv_hook(total: list[int]):
    def hook(module: nn.Conv2d, inputs, output):
        kh, kw = module.kernel_size
        total[0] += output.numel() * (module.in_channels // module.groups) * kh * kw

    return hook


def _moe_hook(moe: MoE, total: list[int]):
    expert_weights = sum(p.numel() for p in moe.experts.parameters() if p.dim() >= 2)
    router_weights = sum(p.numel() for p in moe.router.parameters() if p.dim() >= 2)
    per_token = router_weights + moe.top_k * expert_weights // moe.num_experts

    def hook(module: MoE, inputs, output):
        total[0] += inputs[0].numel() // moe.dim * per_token

    return hook


# -- the digits pool ----------------------------------------------------------------------

# name -> (recipe, overrides or a replacement [model] table, classes trained on or None)
_SPECS: dict[str, tuple[str, Any, list[int] | None]] = {
    "mlp-tiny": ("digits-dense", {"hidden_dims": [8]}, None),
    "mlp-small": ("digits-dense", {"hidden_dims": [32]}, None),
    "mlp-deep": ("digits-dense", {"hidden_dims": [64, 64, 64]}, None),
    "mlp-wide": ("digits-dense", {"hidden_dims": [256, 256]}, None),
    "moe": ("digits-moe", {}, None),
    "lenet5": ("digits-dense", {"kind": "lenet5", "image_size": 8}, None),
    "spec-0-4": ("digits-dense", {"hidden_dims": [64]}, [0, 1, 2, 3, 4]),
    "spec-5-9": ("digits-dense", {"hidden_dims": [64]}, [5, 6, 7, 8, 9]),
}
# Smoke scale: tiny widths (the architecture kinds stay, LeNet-5 included).
_SMOKE_MODEL = {
    "mlp-tiny": {"hidden_dims": [4]},
    "mlp-small": {"hidden_dims": [8]},
    "mlp-deep": {"hidden_dims": [8, 8, 8]},
    "mlp-wide": {"hidden_dims": [16, 16]},
    "moe": {"hidden_dims": [16, 16], "moe": {"num_experts": 4, "top_k": 2, "hidden_dim": 8}},
    "spec-0-4": {"hidden_dims": [8]},
    "spec-5-9": {"hidden_dims": [8]},
}
POOL_SCALES = {
    "smoke": {"steps": 4, "repeats": 3, "members": list(_SPECS)},
    "full": {"steps": 600, "repeats": 30, "members": list(_SPECS)},
}


def member_specs(scale: str) -> dict[str, dict[str, Any]]:
    """The recipe, [model] table and classes of every member of :func:`digits_pool`."""
    if scale not in POOL_SCALES:
        raise ValueError(f"scale must be one of {sorted(POOL_SCALES)}, got {scale!r}")
    specs = {}
    for name in POOL_SCALES[scale]["members"]:
        recipe_name, model_update, classes = _SPECS[name]
        recipe = load_recipe(recipe_name)
        model = dict(recipe["model"]) if "kind" not in model_update else {}
        model.update(model_update)
        if scale == "smoke":
            _merge(model, _SMOKE_MODEL.get(name, {}))
        specs[name] = {"recipe": recipe, "model": model, "classes": classes}
    return specs


def _merge(table: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(table.get(key), dict):
            table[key] = {**table[key], **value}
        else:
            table[key] = value


def digits_pool(scale: str, seed: int) -> tuple[MemberPool, dict[str, tuple[Tensor, Tensor]]]:
    """Train the digits pool; return it and ``{"train", "val", "test"}`` as (x [N,1,8,8], y [N]).

    Every member is trained by ``gatelab.recipes.build_run(recipe).trainer().fit()`` on the
    train split of ``load_digits(seed=seed)`` (the specialists on their classes' rows only),
    in a temporary run directory; ``scale`` "smoke" (tiny members, a few steps) or "full"
    (600 steps each, the recipes' settings).
    """
    specs = member_specs(scale)
    splits = load_digits(seed=seed)
    data = {k: (s.images, s.labels) for k, s in splits.items()}
    settings = POOL_SCALES[scale]
    members = []
    with tempfile.TemporaryDirectory(prefix="gatelab-pool-") as tmp:
        for i, (name, spec) in enumerate(specs.items()):
            model = _train_member(spec, data["train"], settings["steps"], seed, Path(tmp) / name)
            members.append(_profile(name, model, data["val"][0], settings["repeats"], spec))
    return MemberPool(members), data


def _train_member(spec: dict, train: tuple[Tensor, Tensor], steps: int, seed: int, run_dir: Path):
    recipe = dict(spec["recipe"], model=spec["model"])
    recipe["data"] = {**recipe["data"], "seed": seed}
    recipe["train"] = {
        **recipe["train"],
        **{"steps": steps, "seed": seed, "run_dir": str(run_dir), "eval_every": 0},
        **{"save_every": 0, "routing_every": 0, "progress": False, "verbose": False},
        **{"tensorboard": False, "warmup_steps": min(30, steps // 10)},
    }
    torch.manual_seed(seed)
    run = build_run(recipe)
    if spec["classes"] is not None:  # a specialist sees only its classes' rows
        x, y = train
        keep = torch.isin(y, torch.tensor(spec["classes"]))
        run.data = TensorBatches(x[keep], y[keep], batch_size=run.data.batch_size, seed=seed)
    run.trainer(evaluate=False).fit()
    return LogitsOnly(run.model).eval()


def _profile(name: str, model: nn.Module, val_x: Tensor, repeats: int, spec: dict) -> Member:
    one, batch = val_x[:1], val_x[:32]
    return Member(
        name=name,
        model=model,
        params=sum(p.numel() for p in model.parameters()),
        flops=count_flops(model, one),
        latency_s=measure_latency(model, one, repeats),
        batch_latency_s=measure_latency(model, batch, repeats) / len(batch),
        classes=spec["classes"],
    )
