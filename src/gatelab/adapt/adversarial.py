"""Adversarial training primitives: PGD-linf attacks and the TRADES loss.

PGD as in Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks"
(arXiv 1706.06083); TRADES as in Zhang et al., "Theoretically Principled Trade-off between
Robustness and Accuracy" (arXiv 1901.08573). Used by :mod:`gatelab.adapt.advmoe`, which
re-exports these names; the KL direction follows the TRADES code (see there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["AttackConfig", "pgd_linf", "trades_kl", "trades_loss"]


@dataclass(frozen=True)
class AttackConfig:
    """PGD-linf settings: radius, step size and number of steps."""

    eps: float = 0.1
    step_size: float = 0.05
    steps: int = 3

    def __post_init__(self) -> None:
        if self.eps < 0 or self.step_size <= 0 or self.steps < 0:
            raise ValueError(
                f"need eps >= 0, step_size > 0 and steps >= 0, got {self.eps}, "
                f"{self.step_size}, {self.steps}"
            )


def pgd_linf(
    loss_fn: Callable[[Tensor], Tensor],
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    start: str = "uniform",
    low: float = 0.0,
    high: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """L∞ projected gradient ascent (PGD-sign) on ``loss_fn(x_adv)`` (a scalar), detached.

    ``start``: "uniform" (U(-eps, eps), Madry et al.), "normal" (x + 0.001·N(0, 1), TRADES and
    AdvMoE) or "none". Each step adds step_size·sign(grad), then projects to the eps-ball around
    ``x`` and clips to [low, high]. ``steps == 0`` returns the (projected) start.
    """
    if eps < 0 or step_size <= 0 or steps < 0:
        raise ValueError(
            f"need eps >= 0, step_size > 0 and steps >= 0, got eps={eps}, "
            f"step_size={step_size}, steps={steps}"
        )
    if low >= high:
        raise ValueError(f"need low < high for the valid range, got [{low}, {high}]")
    x = x.detach()
    if start == "uniform":
        noise = torch.rand(x.shape, generator=generator, device=x.device) * 2 - 1
        x_adv = x + eps * noise
    elif start == "normal":
        x_adv = x + 0.001 * torch.randn(x.shape, generator=generator, device=x.device)
    elif start == "none":
        x_adv = x.clone()
    else:
        raise ValueError(f"start must be 'uniform', 'normal' or 'none', got {start!r}")
    x_adv = _project(x_adv, x, eps, low, high)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(loss_fn(x_adv), x_adv)
        x_adv = _project(x_adv.detach() + step_size * grad.sign(), x, eps, low, high)
    return x_adv.detach()


def _project(x_adv: Tensor, x: Tensor, eps: float, low: float, high: float) -> Tensor:
    return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(low, high)


def trades_kl(logits_adv: Tensor, logits_clean: Tensor) -> Tensor:
    """KL(softmax(clean) ‖ softmax(adv)) summed over classes, averaged over the batch."""
    if logits_adv.shape != logits_clean.shape or logits_adv.dim() != 2:
        raise ValueError(
            f"logits_adv and logits_clean must both be [B, C], got {tuple(logits_adv.shape)} "
            f"and {tuple(logits_clean.shape)}"
        )
    return F.kl_div(
        logits_adv.log_softmax(-1),
        logits_clean.log_softmax(-1),
        reduction="batchmean",
        log_target=True,
    )


def trades_loss(logits_clean: Tensor, logits_adv: Tensor, labels: Tensor, beta: float) -> Tensor:
    """TRADES: CE(clean, y) + beta · KL(clean ‖ adv)."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    return F.cross_entropy(logits_clean, labels) + beta * trades_kl(logits_adv, logits_clean)
