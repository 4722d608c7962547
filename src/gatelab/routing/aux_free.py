"""Aux-loss-free load balancing, applied outside forward as torchtitan does.

"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (Wang et al.,
arXiv 2408.15664), used by DeepSeek-V3: after each optimizer step every biased router
moves its selection bias by ``bias_update_rate * sign(mean load - load)``.
"""

from __future__ import annotations

import torch
from torch import nn


def update_expert_bias(model: nn.Module) -> int:
    """Apply the sign rule to every router in ``model`` that has one; returns how many."""
    updated = 0
    for module in model.modules():
        update = getattr(module, "update_bias", None)
        if callable(update) and getattr(module, "bias_update_rate", 0) > 0:
            update()
            updated += 1
    return updated


def attach_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`update_expert_bias` after every ``optimizer.step()``; returns the handle."""
    return optimizer.register_step_post_hook(lambda *_: update_expert_bias(model))
