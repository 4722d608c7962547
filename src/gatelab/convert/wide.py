"""MoE <-> wide masked MLP: an MoE layer's routed experts as one MLP of width E * F.

The identity behind it (see :mod:`gatelab.layers.wide_mlp`): concatenating the hidden units
of E experts gives one wide MLP whose units are masked by the routing.
:func:`moe_to_wide` exports an MoE (or an ExpertBank) to a :class:`~gatelab.layers.WideMLP`,
run with ``routing_mask(routing, F)``; :func:`wide_to_moe` imports it back. The round trip is
exact (tested in float64).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..experts import ExpertBank
from ..layers import MoE
from ..layers.wide_mlp import WideMLP

__all__ = ["moe_to_wide", "wide_to_moe"]


def moe_to_wide(moe: MoE | ExpertBank) -> WideMLP:
    """The wide MLP holding the routed experts of ``moe`` (an MoE layer or an ExpertBank).

    Use it with ``routing_mask(routing, moe.hidden_dim)``. The shared expert of an MoE is
    dense and not part of the routed form: a layer with one is refused.
    """
    bank = moe.experts if isinstance(moe, MoE) else moe
    if isinstance(moe, MoE) and moe.shared_experts is not None:
        raise ValueError(
            "moe_to_wide exports the routed experts; this MoE also has a shared expert, "
            "which every token passes and which stays outside the masked wide MLP"
        )
    if not isinstance(bank, ExpertBank):
        raise TypeError(f"moe_to_wide needs a gatelab MoE or ExpertBank, got {type(bank).__name__}")
    w = bank.weights()
    e, f, d = bank.num_experts, bank.hidden_dim, bank.dim
    wide = WideMLP(d, e, f, act=bank.act, glu=bank.glu, bias=w.b_in is not None)
    wide = wide.to(device=w.w_in.device, dtype=w.w_in.dtype)
    with torch.no_grad():
        wide.w_in.copy_(_fold_rows(w.w_in, bank.glu))
        wide.down_proj.copy_(w.w_out.permute(1, 0, 2).reshape(d, e * f))
        if w.b_in is not None:
            wide.in_bias.copy_(_fold_rows(w.b_in.unsqueeze(-1), bank.glu).squeeze(-1))
            wide.block_bias.copy_(w.b_out)
    return wide


def wide_to_moe(wide: WideMLP, top_k: int = 1, **moe_kwargs) -> MoE:
    """An MoE whose experts are the blocks of ``wide`` (router and other settings from
    ``moe_kwargs``: see :class:`MoE`). Run it on a mask's routing with
    ``routing_edit=lambda r: mask_to_routing(mask, wide.block_dim, r.num_slots)`` or call a
    dispatcher with that routing's slots."""
    if not isinstance(wide, WideMLP):
        raise TypeError(f"wide_to_moe needs a WideMLP, got {type(wide).__name__}")
    e, f, d = wide.num_blocks, wide.block_dim, wide.dim
    bias = wide.in_bias is not None
    bank = ExpertBank(e, d, f, act=wide.act, glu=wide.glu, bias=bias)
    bank = bank.to(device=wide.w_in.device, dtype=wide.w_in.dtype)
    with torch.no_grad():
        getattr(bank, bank.in_name).copy_(_unfold_rows(wide.w_in, e, wide.glu))
        bank.down_proj.copy_(wide.down_proj.reshape(d, e, f).permute(1, 0, 2))
        if bias:
            in_bias = _unfold_rows(wide.in_bias.unsqueeze(-1), e, wide.glu).squeeze(-1)
            getattr(bank, bank.in_name + "_bias").copy_(in_bias)
            bank.down_proj_bias.copy_(wide.block_bias)
    moe = MoE(d, f, e, top_k, experts=bank, **moe_kwargs)
    return moe.to(device=wide.w_in.device, dtype=wide.w_in.dtype)


def _fold_rows(w: Tensor, glu: bool) -> Tensor:
    """[E, H, C] expert rows -> [H E, C] wide rows (GLU: all gates, then all ups)."""
    e, h, c = w.shape
    if not glu:
        return w.reshape(e * h, c)
    f = h // 2
    return torch.cat([w[:, :f].reshape(e * f, c), w[:, f:].reshape(e * f, c)])


def _unfold_rows(w: Tensor, num_blocks: int, glu: bool) -> Tensor:
    """The inverse of :func:`_fold_rows`."""
    rows, c = w.shape
    if not glu:
        return w.reshape(num_blocks, rows // num_blocks, c)
    gate, up = w.chunk(2)
    return torch.cat([gate.reshape(num_blocks, -1, c), up.reshape(num_blocks, -1, c)], dim=1)
