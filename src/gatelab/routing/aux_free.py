"""Aux-loss-free load balancing, applied outside forward as torchtitan does.

"Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts" (Wang et al.,
arXiv 2408.15664), used by DeepSeek-V3: after each optimizer step every biased router
moves its selection bias by ``bias_update_rate * sign(mean load - load)``.

A *biased router* (gatelab's :class:`~gatelab.routing.routers.SigmoidRouter`, or any module
following the same contract) carries an ``expert_bias`` buffer, a ``tokens_seen`` [E] tensor
of the tokens each expert received since the last update, a ``bias_update_rate`` and an
``update_bias()`` method. :func:`biased_routers` is the one place that recognises them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["attach_bias_update", "biased_routers", "update_expert_bias"]


def biased_routers(model: nn.Module) -> list[nn.Module]:
    """The aux-loss-free biased routers in ``model`` (itself included), in module order:
    every module with a callable ``update_bias`` and a ``tokens_seen`` tensor."""
    return [
        module
        for module in model.modules()
        if callable(getattr(module, "update_bias", None))
        and isinstance(getattr(module, "tokens_seen", None), Tensor)
    ]


def update_expert_bias(model: nn.Module) -> int:
    """Apply the sign rule to every router in ``model`` that has one; returns how many."""
    updated = 0
    for router in biased_routers(model):
        if getattr(router, "bias_update_rate", 0) > 0:
            router.update_bias()
            updated += 1
    return updated


def attach_bias_update(optimizer: torch.optim.Optimizer, model: nn.Module):
    """Run :func:`update_expert_bias` after every ``optimizer.step()``; returns the handle."""
    return optimizer.register_step_post_hook(lambda *_: update_expert_bias(model))
