"""The loop dispatcher: one expert at a time. Slow, obvious, and the oracle for the rest."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..experts.bank import ExpertWeights
from .checks import check_dispatch_inputs


def loop_dispatch(
    x: Tensor, experts: Tensor, weights: Tensor, bank: ExpertWeights, deterministic: bool = True
) -> Tensor:
    """Sum over slots of weight * expert(x) for x [T, D], experts/weights [T, K]."""
    check_dispatch_inputs(x, experts, weights, bank)
    # unbind once: indexing the [E, ...] parameter per expert would give each expert a
    # dense [E, ...] gradient (HF's eager path does, which is why its backward is slow).
    w_in, w_out = bank.w_in.unbind(0), bank.w_out.unbind(0)
    b_in = bank.b_in.unbind(0) if bank.b_in is not None else [None] * bank.num_experts
    b_out = bank.b_out.unbind(0) if bank.b_out is not None else [None] * bank.num_experts
    out = torch.zeros_like(x)
    routed = False
    for e in range(bank.num_experts):
        tokens, slots = torch.where(experts == e)
        if tokens.numel() == 0:
            continue
        hidden = bank.activate(F.linear(x[tokens], w_in[e], b_in[e]))
        y = F.linear(hidden, w_out[e], b_out[e])
        out = out.index_add(
            0, tokens, (y * weights[tokens, slots].unsqueeze(1).to(y.dtype)).to(out.dtype)
        )  # autocast: y may be bf16
        routed = True
    if not routed:
        # Keep the inputs in the graph so backward yields zero gradients, as grouped does.
        tensors = (x, weights, *(t for t in bank[:4] if t is not None))
        out = out + 0 * sum(t.sum() for t in tensors)
    return out
