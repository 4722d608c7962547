"""LoRA: low-rank adapters on the linear layers of a frozen model.

"LoRA: Low-Rank Adaptation of Large Language Models" (Hu et al., arXiv 2106.09685). A frozen
``nn.Linear`` W gets a trainable update ``ΔW = (alpha / rank) · B A`` with A [rank, in] and
B [out, rank]; B starts at zero, so the adapted model starts equal to the base::

    add_lora(model, targets=["fc1", "fc2"], rank=4, alpha=8)   # freezes the base
    opt = torch.optim.AdamW(lora_parameters(model), lr=1e-2)
    ...                                                         # train
    merge_lora(model)                                           # plain nn.Linear again

``targets`` are names as ``model.named_modules()`` gives them: a target matches a module whose
full name equals it or ends with ``"." + target``, or any name matching it as an ``fnmatch``
pattern (``"blocks.*.fc1"``). gatelab's LoRA needs no PEFT; PEFT's ``LoraConfig(r, lora_alpha,
lora_dropout, target_modules)`` is the same parametrisation when it is installed.

Departures from the paper: A is initialised like ``nn.Linear``'s weight (Kaiming-uniform with
a = sqrt(5), as PEFT does) where the paper says "random Gaussian"; both give an update that
starts at zero because B does. Dropout on the adapter's input (the paper has none; PEFT's
``lora_dropout``) defaults to 0.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a rank-``rank`` update scaled by ``alpha / rank``.

    ``base`` keeps its own parameters (frozen here: ``requires_grad=False``); ``lora_A``
    [rank, in_features] and ``lora_B`` [out_features, rank] are the only trainable ones.
    """

    def __init__(
        self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_rank(rank, base.in_features, base.out_features)
        if alpha is not None and not alpha > 0:
            raise ValueError(f"alpha must be > 0 (or None for alpha = rank), got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        self.scaling = self.alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def delta(self, x: Tensor) -> Tensor:
        """The adapter's contribution (alpha / rank) · B A x, without the base."""
        return (self.dropout(x) @ self.lora_A.t() @ self.lora_B.t()) * self.scaling

    def delta_weight(self) -> Tensor:
        """ΔW = (alpha / rank) · B A, [out_features, in_features]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"LoRALinear expects inputs [..., {self.in_features}], got {tuple(x.shape)}"
            )
        return self.base(x) + self.delta(x)

    def merged(self) -> nn.Linear:
        """A new ``nn.Linear`` with W + ΔW (and the base bias); this module is unchanged."""
        base = self.base
        out = nn.Linear(
            base.in_features,
            base.out_features,
            bias=base.bias is not None,
            device=base.weight.device,
            dtype=base.weight.dtype,
        )
        with torch.no_grad():
            out.weight.copy_(base.weight + self.delta_weight())
            if base.bias is not None:
                out.bias.copy_(base.bias)
        return out

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}"


def _check_rank(rank: int, in_features: int, out_features: int) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive int, got {rank!r}")
    if rank > min(in_features, out_features):
        raise ValueError(
            f"rank={rank} exceeds min(in_features, out_features) = "
            f"{min(in_features, out_features)} of the target linear layer; a LoRA update of "
            "that rank is not low-rank: lower rank or fine-tune the layer directly"
        )


def _matches(name: str, target: str) -> bool:
    return name == target or name.endswith("." + target) or fnmatch.fnmatchcase(name, target)


def find_linear_targets(model: nn.Module, targets: str | Iterable[str]) -> list[str]:
    """Full names of the ``nn.Linear`` modules of ``model`` that ``targets`` name.

    Raises when a target matches nothing, or matches only modules that are not linear.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise ValueError("targets is empty: name at least one nn.Linear module to adapt")
    modules = dict(model.named_modules())
    wrapped = [n + "." if n else "" for n, m in modules.items() if isinstance(m, LoRALinear)]
    modules = {n: m for n, m in modules.items() if not n.startswith(tuple(wrapped))}
    found: list[str] = []
    for target in targets:
        hits = [n for n in modules if n and _matches(n, target)]
        linear = [n for n in hits if type(modules[n]) is nn.Linear]
        if not linear:
            kinds = sorted({type(modules[n]).__name__ for n in hits})
            linears = [n for n, m in modules.items() if type(m) is nn.Linear]
            raise ValueError(
                f"target {target!r} matches no nn.Linear in the model"
                + (f" (it matches: {', '.join(kinds)})" if kinds else "")
                + f"; its linear layers are: {', '.join(linears) or 'none'}"
            )
        found.extend(n for n in linear if n not in found)
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def add_lora(
    model: nn.Module,
    targets: str | Iterable[str],
    rank: int,
    alpha: float | None = None,
    *,
    dropout: float = 0.0,
    freeze: bool = True,
) -> list[str]:
    """Replace the linear layers ``targets`` names with :class:`LoRALinear`, in place.

    ``freeze=True`` (the paper's setting) sets ``requires_grad=False`` on every parameter
    the model had before, so only the adapters train; pass ``freeze=False`` to keep, e.g.,
    a task head trainable. Returns the names of the adapted modules. ``alpha`` defaults to
    ``rank`` (scaling 1).
    """
    names = find_linear_targets(model, targets)
    for name in names:  # validate every layer before changing any
        layer = model.get_submodule(name)
        _check_rank(rank, layer.in_features, layer.out_features)
    if freeze:
        model.requires_grad_(False)
    for name in names:
        _set_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """The :class:`LoRALinear` modules of ``model`` by full name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' parameters (every ``lora_A`` and ``lora_B``), for the optimizer."""
    return [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its layer: each :class:`LoRALinear` becomes an ``nn.Linear``
    with W + ΔW, in place (no extra cost at inference). Returns ``model``; a model without
    adapters is returned unchanged."""
    if isinstance(model, LoRALinear):
        return model.merged()
    for name, module in lora_modules(model).items():
        merged = module.merged()
        merged.requires_grad_(module.base.weight.requires_grad)
        _set_module(model, name, merged)
    return model


__all__ = [
    "LoRALinear",
    "add_lora",
    "find_linear_targets",
    "lora_modules",
    "lora_parameters",
    "merge_lora",
]
