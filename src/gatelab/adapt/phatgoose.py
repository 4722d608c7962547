"""PHATGOOSE: route among LoRA experts trained separately, per token and per module, post hoc.

"Learning to Route Among Specialized Experts for Zero-Shot Generalization" (Muqeeth et al.,
ICML 2024, arXiv 2402.05859; reference code ``r-three/phatgoose``). Three steps:

1. Each contributor trains a LoRA expert on its own task with the base frozen
   (:func:`train_lora_expert`, gatelab's :mod:`~gatelab.adapt.lora`).
2. With base and expert frozen, a sigmoid gate per adapted module is trained for a few steps:
   the module input is scaled per token, h -> h · sigmoid(v·h), before the LoRA branch only
   (:class:`GatedLoRALinear`, :func:`train_gates`; v starts at zero, AdamW, lr 5e-3, 100
   steps, 6% warm-up, no weight decay, as in the reference code).
3. The gate vectors become a router (:class:`PhatGooseRouter`): for every token and module,
   score_e = standardise(h) · standardise(v_e) / sqrt(d), softmax over experts, top-2,
   renormalised; :func:`phatgoose_model` assembles one model whose adapted layers
   (:class:`PhatGooseLinear`) add the chosen experts' LoRA updates.

Departures from the paper: the paper adapts T5's attention and FFN linears, trains each LoRA
for 1000 steps and gates with an effective batch of 1024; here any ``nn.Linear`` named by
``targets`` is adapted and the step counts and batch size are arguments (a digits MLP needs
fewer). In the routed model the learned gate's sigmoid is not applied (the reference code
replaces the gate by the router when it turns gates into router vectors); the chosen experts'
updates are weighted by the renormalised routing weights. All experts' updates are computed
densely and then gathered: exact, and cheap for the handful of small experts used here, but not
a sparse dispatch. :class:`PhatGooseLinear` also runs ``"uniform"`` (the mean of the experts'
ΔW, the merging baseline) and a single expert, for comparisons.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..routing import EMPTY, ROUTERS, Routing
from ..routing.routers import Router, top_k
from .lora import LoRALinear, add_lora, lora_modules, lora_parameters


def standardize(x: Tensor, eps: float = 1e-5) -> Tensor:
    """(x - mean) / std over the last dim: LayerNorm without affine parameters."""
    return F.layer_norm(x, x.shape[-1:], eps=eps)


@ROUTERS.register("phatgoose")
class PhatGooseRouter(Router):
    """PHATGOOSE's post-hoc router (arXiv 2402.05859): the rows of ``weight`` [E, D] are
    the experts' trained gate vectors; logits = standardise(x) · standardise(w_e) / sqrt(D),
    scores = softmax, the ``top_k`` best renormalised to sum to 1 (the paper's top-2).

    The weight is not trained here (``requires_grad=False``); set it with :meth:`load_gates`.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, nan_policy: str = "raise"):
        super().__init__(dim, num_experts, top_k, nan_policy)
        self.weight.requires_grad_(False)

    def load_gates(self, gates: Tensor) -> PhatGooseRouter:
        gates = torch.as_tensor(gates)
        if gates.shape != (self.num_experts, self.dim):
            raise ValueError(
                f"gates must be [num_experts, dim] = [{self.num_experts}, {self.dim}], got "
                f"{tuple(gates.shape)}"
            )
        with torch.no_grad():
            self.weight.copy_(gates)
        return self

    def compute_logits(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.dim:
            raise ValueError(f"router input must be [T, {self.dim}], got {tuple(x.shape)}")
        w = standardize(self.weight.float())
        logits = standardize(x.float()) @ w.t() / math.sqrt(self.dim)
        self._check_logits(logits)
        return logits

    def route(self, logits: Tensor) -> Routing:
        scores = logits.softmax(dim=-1)
        weights, experts = top_k(scores, self.top_k)
        weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        return Routing(logits, scores, experts, weights)


class GatedLoRALinear(nn.Module):
    """One trained LoRA expert with PHATGOOSE's per-token sigmoid gate on its input.

    y = W h + ΔW (h · sigmoid(v·h)); ``v`` (``gate``, [in_features], zeros at the start) is
    the only trainable parameter: the base and the LoRA factors are frozen here.
    """

    def __init__(self, lora: LoRALinear) -> None:
        super().__init__()
        if not isinstance(lora, LoRALinear):
            raise TypeError(f"GatedLoRALinear wraps a LoRALinear, got {type(lora).__name__}")
        self.lora = lora
        self.lora.requires_grad_(False)
        self.gate = nn.Parameter(torch.zeros(lora.in_features, dtype=lora.lora_A.dtype))

    def gate_values(self, x: Tensor) -> Tensor:
        """sigmoid(v·h) per token, [...]."""
        return torch.sigmoid(x @ self.gate)

    def forward(self, x: Tensor) -> Tensor:
        return self.lora.base(x) + self.lora.delta(x * self.gate_values(x).unsqueeze(-1))


class PhatGooseLinear(nn.Module):
    """A frozen ``nn.Linear`` plus E LoRA experts, combined per token by a router.

    ``mode`` picks how: ``"route"`` (PHATGOOSE: :class:`PhatGooseRouter`, top-k of the gate
    vectors), ``"uniform"`` (every expert's ΔW averaged: uniform merging) or an int e (expert e
    alone). Experts of different ranks are zero-padded to the largest rank. The last routing
    is kept in ``last_routing`` for inspection.
    """

    MODES = ("route", "uniform")

    def __init__(
        self,
        base: nn.Linear,
        lora_A: Sequence[Tensor],
        lora_B: Sequence[Tensor],
        scaling: Sequence[float],
        gates: Tensor,
        top_k: int = 2,
    ) -> None:
        super().__init__()
        num_experts = len(lora_A)
        if not (num_experts == len(lora_B) == len(scaling) == len(gates)) or num_experts == 0:
            raise ValueError(
                "need one lora_A, lora_B, scaling and gate per expert (at least one), got "
                f"{len(lora_A)}, {len(lora_B)}, {len(scaling)}, {len(gates)}"
            )
        self.base = base
        base.requires_grad_(False)
        rank = max(a.shape[0] for a in lora_A)
        d_in, d_out = base.in_features, base.out_features
        A = torch.zeros(num_experts, rank, d_in, dtype=base.weight.dtype)
        B = torch.zeros(num_experts, d_out, rank, dtype=base.weight.dtype)
        for e, (a, b) in enumerate(zip(lora_A, lora_B, strict=True)):
            if a.shape[1] != d_in or b.shape[0] != d_out or a.shape[0] != b.shape[1]:
                raise ValueError(
                    f"expert {e}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit "
                    f"a linear layer {d_in} -> {d_out}"
                )
            A[e, : a.shape[0]] = a.detach()
            B[e, :, : b.shape[1]] = b.detach()
        self.register_buffer("lora_A", A)
        self.register_buffer("lora_B", B)
        self.register_buffer("scaling", torch.tensor(list(scaling), dtype=base.weight.dtype))
        self.router = PhatGooseRouter(d_in, num_experts, top_k).load_gates(gates)
        self.mode: str | int = "route"
        self.last_routing: Routing | None = None

    @property
    def num_experts(self) -> int:
        return self.lora_A.shape[0]

    def set_mode(self, mode: str | int) -> None:
        if isinstance(mode, bool) or not (
            mode in self.MODES or (isinstance(mode, int) and 0 <= mode < self.num_experts)
        ):
            raise ValueError(
                f"mode must be one of {self.MODES} or an expert index in "
                f"[0, {self.num_experts}), got {mode!r}"
            )
        self.mode = mode

    def expert_deltas(self, x: Tensor) -> Tensor:
        """Every expert's update for every token: [T, E, out_features]."""
        z = torch.einsum("ti,eri->ter", x, self.lora_A)
        return torch.einsum("ter,eor->teo", z, self.lora_B) * self.scaling[:, None]

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        if shape[-1] != self.base.in_features:
            raise ValueError(
                f"PhatGooseLinear expects inputs [..., {self.base.in_features}], got {tuple(shape)}"
            )
        flat = x.reshape(-1, shape[-1])
        out = self.base(flat)
        if self.mode == "uniform":
            delta_w = (self.lora_B @ self.lora_A * self.scaling[:, None, None]).mean(0)
            out = out + flat @ delta_w.t()
        elif self.mode == "route":
            routing = self.router(flat)
            self.last_routing = routing
            chosen = routing.experts.clamp_min(0)  # EMPTY slots carry weight 0
            deltas = self.expert_deltas(flat)
            picked = deltas.gather(1, chosen[..., None].expand(-1, -1, deltas.shape[-1]))
            weights = torch.where(routing.experts == EMPTY, 0.0, routing.weights)
            out = out + (picked * weights[..., None].to(picked.dtype)).sum(1)
        else:
            e = self.mode
            out = out + (flat @ self.lora_A[e].t() @ self.lora_B[e].t()) * self.scaling[e]
        return out.reshape(*shape[:-1], out.shape[-1])


# -- the three steps ------------------------------------------------------------------------


def fit_classifier(
    model: nn.Module,
    params: Sequence[nn.Parameter],
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    batch_size: int = 128,
    warmup: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> list[float]:
    """AdamW on cross-entropy over minibatches of (x, y); linear warm-up over the first
    ``warmup`` share of the steps, then constant (PHATGOOSE's gate schedule). Returns the
    losses."""
    params = list(params)
    if not params:
        raise ValueError("no parameters to train: params is empty")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps}, {batch_size}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    warm = max(1, round(warmup * steps))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warm))
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (min(batch_size, len(x)),), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def train_lora_expert(
    base: nn.Module,
    targets: str | Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    rank: int = 4,
    alpha: float | None = None,
    steps: int = 300,
    lr: float = 1e-2,
    batch_size: int = 128,
    seed: int = 0,
) -> nn.Module:
    """Step 1: a copy of ``base`` with LoRA on ``targets``, trained on one task (x, y)."""
    model = copy.deepcopy(base)
    torch.manual_seed(seed)  # the A initialisation
    add_lora(model, targets, rank, alpha)
    fit_classifier(
        model, lora_parameters(model), x, y, steps=steps, lr=lr, batch_size=batch_size, seed=seed
    )
    return model


def train_gates(
    expert: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    steps: int = 100,
    lr: float = 5e-3,
    batch_size: int = 128,
    warmup: float = 0.06,
    seed: int = 0,
) -> nn.Module:
    """Step 2: wrap every LoRA layer of ``expert`` (in place) in a :class:`GatedLoRALinear`
    and train only the gates on the expert's task (x, y); returns ``expert``."""
    layers = lora_modules(expert)
    if not layers:
        raise ValueError("expert has no LoRALinear layers: train it with train_lora_expert")
    expert.requires_grad_(False)
    for name, layer in layers.items():
        parent, _, child = name.rpartition(".")
        setattr(expert.get_submodule(parent) if parent else expert, child, GatedLoRALinear(layer))
    gates = [m.gate for m in expert.modules() if isinstance(m, GatedLoRALinear)]
    fit_classifier(
        expert, gates, x, y, steps=steps, lr=lr, batch_size=batch_size, warmup=warmup, seed=seed
    )
    return expert


def gated_modules(model: nn.Module) -> dict[str, GatedLoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, GatedLoRALinear)}


def phatgoose_model(base: nn.Module, experts: Sequence[nn.Module], top_k: int = 2) -> nn.Module:
    """Step 3: a copy of ``base`` whose adapted layers are :class:`PhatGooseLinear` over the
    gated ``experts`` (from :func:`train_gates`). All experts must adapt the same layers."""
    if not experts:
        raise ValueError("experts is empty: pass the gated experts to route among")
    per_expert = [gated_modules(e) for e in experts]
    names = list(per_expert[0])
    if not names:
        raise ValueError("expert 0 has no gated LoRA layers: run train_gates on each expert")
    for i, layers in enumerate(per_expert):
        if list(layers) != names:
            raise ValueError(
                f"expert {i} adapts {sorted(layers)}, expert 0 adapts {sorted(names)}; "
                "PHATGOOSE needs every expert to adapt the same layers"
            )
    model = copy.deepcopy(base)
    model.requires_grad_(False)
    for name in names:
        layers = [p[name] for p in per_expert]
        base_linear = model.get_submodule(name)
        if type(base_linear) is not nn.Linear:
            raise ValueError(f"base layer {name!r} is {type(base_linear).__name__}, not nn.Linear")
        mixed = PhatGooseLinear(
            base_linear,
            [g.lora.lora_A for g in layers],
            [g.lora.lora_B for g in layers],
            [g.lora.scaling for g in layers],
            torch.stack([g.gate.detach() for g in layers]),
            top_k=top_k,
        )
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, mixed)
    return model


def phatgoose_layers(model: nn.Module) -> dict[str, PhatGooseLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, PhatGooseLinear)}


def set_mode(model: nn.Module, mode: str | int) -> nn.Module:
    """Set every :class:`PhatGooseLinear` of ``model`` to ``mode`` ("route", "uniform", e)."""
    layers = phatgoose_layers(model)
    if not layers:
        raise ValueError("model has no PhatGooseLinear layers: build it with phatgoose_model")
    for layer in layers.values():
        layer.set_mode(mode)
    return model


__all__ = [
    "GatedLoRALinear",
    "PhatGooseLinear",
    "PhatGooseRouter",
    "fit_classifier",
    "gated_modules",
    "phatgoose_layers",
    "phatgoose_model",
    "set_mode",
    "standardize",
    "train_gates",
    "train_lora_expert",
]
