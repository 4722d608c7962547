"""Routing decisions on the global batch: capacity and expert choice across ranks.

Under data parallelism each rank routes its own tokens. Top-k routing decides token by
token, so that is the single-process decision. Two rules let tokens compete for experts,
and per rank they compete only with the rank's own tokens:

- **capacity** (``capacity_factor``): each expert keeps ``C = ceil(cf * T * k / E)`` slots,
  first choices of earlier tokens first. Per rank, ``T`` is the rank's tokens, so each
  rank fills its own ``C / W`` (DeepSpeed's local capacity);
- **expert choice** (the ``expert_choice`` router): each expert takes its top ``C``
  tokens by score; per rank, its top ``C / W`` of the rank's tokens.

``parallelize(..., global_routing=True)`` makes both decide on the global batch, as one
process on the full batch does (the default stays per rank):

- :class:`GlobalCapacity` replaces ``MoE.capacity_rule``: the ranks all-gather their
  slots' experts ([T, k] int64 per rank), each computes the keep mask of the whole batch
  (``routing.capacity.capacity_keep``) and applies its own rows. No gradient crosses:
  capacity only empties slots.
- :class:`GlobalExpertChoice` replaces the router's ``route``: the ranks all-gather their
  logits ([T, E] float32 per rank, differentiable), each runs the expert-choice rule on
  the whole batch and keeps its own rows; the backward returns each rank the gradient
  of its own rows (every rank differentiates only the rows it kept).

Cost per MoE layer and forward: ``T k`` int64 (capacity) or ``T E`` float32 (expert
choice) per rank, all-gathered over all W ranks, so each rank receives ``(W - 1) T k 8``
or ``(W - 1) T E 4`` bytes, a latency-bound collective on the critical path of every
MoE layer (it cannot overlap: dispatch waits for the decision). Next to the token
all-to-all (``4 k T D s (W-1)/W`` per step) it is small when ``E << D``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..routing import Routing
from ..routing.capacity import capacity_keep, keep_within_capacity
from . import _gather_rows

__all__ = ["GlobalCapacity", "GlobalExpertChoice", "make_decisions_global"]


def _sizes(rows: int, device, group) -> list[int]:
    size = torch.tensor([rows], device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, size, group=group)
    return [int(s) for s in sizes]


class _GatherOwnRows(torch.autograd.Function):
    """All-gather rows; backward returns this rank's rows of the gradient (each rank uses
    only its own rows of the gathered result, so nothing arrives from the others)."""

    @staticmethod
    def forward(ctx, rows, sizes, rank, group):
        ctx.span = (sum(sizes[:rank]), sizes[rank])
        return _gather_rows(rows, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        start, count = ctx.span
        return grad[start : start + count], None, None, None


class GlobalCapacity:
    """``MoE.capacity_rule`` deciding on the global batch (see the module docstring)."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)

    def __deepcopy__(self, memo) -> GlobalCapacity:
        return self  # holds a process group handle

    def __call__(self, routing: Routing, capacity_factor: float) -> Routing:
        sizes = _sizes(routing.num_tokens, routing.experts.device, self.group)
        everyone = _gather_rows(routing.experts, sizes, self.group)
        keep, capacity = capacity_keep(everyone, routing.num_experts, capacity_factor)
        start = sum(sizes[: self.rank])
        return keep_within_capacity(routing, keep[start : start + sizes[self.rank]], capacity)


class GlobalExpertChoice:
    """An expert-choice router's ``route`` deciding on the global batch."""

    def __init__(self, route, group=None):
        self.route, self.group = route, group
        self.rank = dist.get_rank(group)

    def __deepcopy__(self, memo) -> GlobalExpertChoice:
        import copy

        return GlobalExpertChoice(copy.deepcopy(self.route, memo), self.group)

    def __call__(self, logits: Tensor, **context) -> Routing:
        sizes = _sizes(logits.shape[0], logits.device, self.group)
        everyone = _GatherOwnRows.apply(logits, sizes, self.rank, self.group)
        routing = self.route(everyone, **context)
        rows = slice(sum(sizes[: self.rank]), sum(sizes[: self.rank + 1]))
        return Routing(
            routing.logits[rows],
            routing.scores[rows],
            routing.experts[rows],
            routing.weights[rows],
            dict(routing.aux),
            check=False,
        )


def make_decisions_global(model: nn.Module, group=None) -> int:
    """Install :class:`GlobalCapacity` on every MoE layer and :class:`GlobalExpertChoice`
    on every expert-choice router of ``model``; returns how many rules were made global."""
    from ..layers import MoE
    from ..routing.routers import ExpertChoiceRouter

    made = 0
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        moe.capacity_rule = GlobalCapacity(group)
        made += moe.capacity_factor is not None
        if isinstance(moe.router, ExpertChoiceRouter):
            # An instance attribute shadows the class's route (state_dict names unchanged).
            moe.router.route = GlobalExpertChoice(type(moe.router).route.__get__(moe.router), group)
            made += 1
    return made
