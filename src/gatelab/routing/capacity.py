"""Expert capacity: drop the slots an expert cannot take, deterministically."""

from __future__ import annotations

import math

import torch

from .routing import EMPTY, Routing


def expert_capacity(
    num_tokens: int, num_slots: int, num_experts: int, capacity_factor: float
) -> int:
    """C = ceil(capacity_factor * T * K / E): slots one expert may take."""
    if not capacity_factor > 0:
        raise ValueError(
            f"capacity_factor must be > 0 (None means dropless), got {capacity_factor}"
        )
    return math.ceil(capacity_factor * num_tokens * num_slots / num_experts)


def apply_capacity(routing: Routing, capacity_factor: float) -> Routing:
    """Empty the slots beyond each expert's capacity.

    Priority follows Switch/GShard: every token's first choice comes before any second
    choice, and within one slot rank earlier tokens come first. The Routing returned
    records ``aux["dropped"]`` (slots emptied) and ``aux["capacity"]``.
    """
    keep, capacity = capacity_keep(routing.experts, routing.num_experts, capacity_factor)
    return keep_within_capacity(routing, keep, capacity)


def capacity_keep(
    experts: torch.Tensor, num_experts: int, capacity_factor: float
) -> tuple[torch.Tensor, int]:
    """(keep [T, K] bool, C): which slots of ``experts`` [T, K] fit their expert's capacity,
    in :func:`apply_capacity`'s priority order. A distributed run computes it on the
    experts of the global batch (``gatelab.parallel.global_capacity``)."""
    num_tokens, num_slots = experts.shape
    capacity = expert_capacity(num_tokens, num_slots, num_experts, capacity_factor)
    # Slot-major order: rank 0 of all tokens, then rank 1, ...
    by_priority = experts.t().reshape(-1)
    key = torch.where(by_priority == EMPTY, num_experts, by_priority)
    order = torch.argsort(key, stable=True)
    sorted_key = key[order]
    counts = torch.bincount(sorted_key, minlength=num_experts + 1)
    starts = counts.cumsum(0) - counts
    rank = torch.arange(key.numel(), device=key.device) - starts[sorted_key]
    keep_sorted = rank < capacity
    keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
    return keep.view(num_slots, num_tokens).t(), capacity


def keep_within_capacity(routing: Routing, keep: torch.Tensor, capacity: int) -> Routing:
    """``routing`` with the slots outside ``keep`` emptied; records ``aux["dropped"]`` and
    ``aux["capacity"]``."""
    before = routing.valid.sum()
    out = routing.keep_slots(keep)
    aux = dict(out.aux)
    aux["dropped"] = before - out.valid.sum()
    aux["capacity"] = torch.tensor(capacity)
    return out.replace(aux=aux)
