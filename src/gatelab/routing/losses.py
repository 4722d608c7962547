"""Auxiliary losses as functions of a Routing and an optional token mask.

``token_mask`` is [T] (or any shape with T elements), True/1 for real tokens and False/0
for padding; padding is excluded from every statistic (HF's attention-mask semantics).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .routing import Routing


def _mask(routing: Routing, token_mask: Tensor | None) -> Tensor:
    if token_mask is None:
        return routing.logits.new_ones(routing.num_tokens)
    mask = token_mask.reshape(-1).to(routing.logits.dtype)
    if mask.shape[0] != routing.num_tokens:
        raise ValueError(f"token_mask has {mask.shape[0]} elements for {routing.num_tokens} tokens")
    return mask


def switch_balance_loss(routing: Routing, token_mask: Tensor | None = None) -> Tensor:
    """E * sum_e f_e * P_e (Switch Transformer eq. 4-6, HF ``load_balancing_loss_func``).

    f_e is the share of (non-empty) slots routed to expert e per real token, so it sums to
    k; P_e is the mean router probability (``scores``) of expert e over real tokens.
    Equals k for perfectly uniform routing with uniform scores. Returns 0 for no tokens.
    """
    mask = _mask(routing, token_mask)
    total = mask.sum().clamp_min(1.0)
    slot_mask = routing.valid.to(mask.dtype) * mask.unsqueeze(1)
    index = routing.experts.clamp_min(0)
    counts = mask.new_zeros(routing.num_experts).scatter_add_(
        0, index.reshape(-1), slot_mask.reshape(-1)
    )
    prob = (routing.scores * mask.unsqueeze(1)).sum(dim=0)
    return routing.num_experts * torch.sum((counts / total) * (prob / total))


def z_loss(routing: Routing, token_mask: Tensor | None = None) -> Tensor:
    """Router z-loss (ST-MoE, arXiv 2202.08906): mean over tokens of logsumexp(logits)^2."""
    mask = _mask(routing, token_mask)
    lse = torch.logsumexp(routing.logits, dim=-1)
    return (lse.square() * mask).sum() / mask.sum().clamp_min(1.0)


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, var / mean^2 (Shazeer et al. 2017); 0 for E = 1."""
    values = values.float()
    if values.numel() <= 1:
        return values.new_zeros(())
    return values.var() / (values.mean().square() + eps)


def importance_loss(routing: Routing, token_mask: Tensor | None = None) -> Tensor:
    """CV^2 of each expert's summed combine weight ("Outrageously Large Neural Networks")."""
    mask = _mask(routing, token_mask)
    importance = (routing.dense_weights().float() * mask.unsqueeze(1)).sum(dim=0)
    return cv_squared(importance)


def load_loss(routing: Routing, token_mask: Tensor | None = None) -> Tensor:
    """CV^2 of each expert's token count.

    Shazeer et al. smooth the count with the noisy gate's probability of selection so it
    has a gradient; gatelab's routers have no such noise model, so this is the hard count:
    a balance statistic to monitor or add, not a gradient source.
    """
    mask = token_mask.reshape(-1).bool() if token_mask is not None else None
    return cv_squared(routing.tokens_per_expert(mask))


LOSSES = {
    "balance": switch_balance_loss,
    "z": z_loss,
    "importance": importance_loss,
    "load": load_loss,
}
