"""The grouped dispatcher: sort slots by expert, one grouped GEMM per projection, combine.

``torch.nn.functional.grouped_mm`` runs each projection for all experts in one call where
the running torch has it for the dtype and device; elsewhere (float64, old torch) a loop of
plain matmuls over the same sorted rows gives the same result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..experts.bank import ExpertWeights

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def grouped_mm_supported(x: Tensor, w: Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes these operands on this device."""
    if _GROUPED_MM is None or x.dtype not in _GROUPED_DTYPES or w.dtype != x.dtype:
        return False
    if w.device.type == "cuda":
        # The CUDA kernel needs sm80+ and 16-byte aligned rows.
        itemsize = x.element_size()
        aligned = (w.shape[1] * itemsize) % 16 == 0 and (w.shape[2] * itemsize) % 16 == 0
        return aligned and torch.cuda.get_device_capability(w.device) >= (8, 0)
    return w.device.type == "cpu"


def grouped_linear(x: Tensor, w: Tensor, counts: Tensor, offsets: Tensor) -> Tensor:
    """Rows of x [N, in] sorted by expert times w[e].T ([E, out, in]) -> [N, out]."""
    x = x.to(w.dtype)
    if grouped_mm_supported(x, w):
        return _GROUPED_MM(x, w.transpose(1, 2), offs=offsets)
    pieces = x.split(counts.tolist())
    outs = [
        piece @ w_e.t() for piece, w_e in zip(pieces, w.unbind(0), strict=True) if piece.shape[0]
    ]
    if not outs:
        return x.new_zeros(0, w.shape[1]) + w.sum() * 0  # keep the graph for an empty batch
    return torch.cat(outs)


def grouped_dispatch(
    x: Tensor, experts: Tensor, weights: Tensor, bank: ExpertWeights, deterministic: bool = True
) -> Tensor:
    """Sum over slots of weight * expert(x) for x [T, D], experts/weights [T, K]."""
    num_tokens, num_slots = experts.shape
    num_experts = bank.num_experts
    key = experts.reshape(-1)
    key = torch.where(key < 0, num_experts, key)  # empty slots sort to the end
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=num_experts + 1)
    num_routed = key.numel() - int(counts[num_experts])
    counts = counts[:num_experts]
    order = order[:num_routed]
    sorted_experts = key[order]
    offsets = counts.cumsum(0).to(torch.int32)
    tokens = torch.div(order, num_slots, rounding_mode="floor")

    hidden = grouped_linear(x.index_select(0, tokens), bank.w_in, counts, offsets)
    if bank.b_in is not None:
        hidden = hidden + bank.b_in[sorted_experts]
    y = grouped_linear(bank.activate(hidden), bank.w_out, counts, offsets)
    if bank.b_out is not None:
        y = y + bank.b_out[sorted_experts]
    y = y * weights.reshape(-1)[order].unsqueeze(1).to(y.dtype)
    return combine(y, order, tokens, num_tokens, num_slots, deterministic).to(x.dtype)


def combine(
    y: Tensor, order: Tensor, tokens: Tensor, num_tokens: int, num_slots: int, deterministic: bool
) -> Tensor:
    """Sum each token's weighted expert outputs back into [T, D]."""
    dim = y.shape[1]
    if deterministic and y.device.type != "cpu":
        # index_add_ uses atomics on GPUs; put rows back in slot order and sum over k instead.
        slots = y.new_zeros(num_tokens * num_slots, dim).index_copy(0, order, y)
        return slots.view(num_tokens, num_slots, dim).sum(dim=1)
    # On CPU index_add_ is sequential per row, so it is deterministic already.
    return y.new_zeros(num_tokens, dim).index_add(0, tokens, y)
