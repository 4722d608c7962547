"""UoE's equivalent decomposition: a dense MLP cut into experts whose union is the MLP.

"Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer"
(Yang et al., arXiv 2503.02495).

- :func:`decompose_mlp`: the equivalent decomposition. W1 is split by columns (hidden
  units) and W2 by rows, as Megatron's tensor parallelism splits an MLP: expert i owns
  hidden units i*F/E .. (i+1)*F/E - 1. The sum of all E experts is the dense MLP. The MLP
  is read by :func:`gatelab.experts.read_dense_ffn` (gatelab's family, HF's gated MLPs,
  ``nn.Sequential(Linear, act, Linear)``).
- :func:`decompose_to_moe`: that bank inside a gatelab :class:`~gatelab.layers.MoE`, with
  every expert on at weight 1 (exact) or routed (:mod:`gatelab.routing.uoe`).
- :func:`uoe_mlp`: a trainable Union-of-MLP-Experts layer (UoME) of total width
  ``hidden_dim`` built from scratch.

UoE's attention side, :class:`~gatelab.layers.SelectiveMultiHeadAttention`, is a block and
stays in ``gatelab.layers.uoe``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..experts import ExpertBank, read_dense_ffn
from ..layers import MoE
from ..routing.uoe import AllExpertsRouter

__all__ = ["decompose_mlp", "decompose_to_moe", "uoe_mlp"]


def decompose_mlp(mlp: nn.Module, num_experts: int) -> ExpertBank:
    """An :class:`ExpertBank` of ``num_experts`` slices whose sum is ``mlp`` exactly.

    Expert i owns hidden units i*F/E .. (i+1)*F/E - 1: those rows of W1 (of W_gate and of
    W_up for a GLU) and of b1, and those columns of W2. The output bias b2 is not a hidden
    unit; each expert carries b2 / E, so the sum of all E experts adds b2 once (the union
    is exact up to rounding; an expert subset adds its share, k/E of b2). The bank is a
    copy in the MLP's dtype and device; training it does not touch ``mlp``. The MLP's
    dropout is not carried over (banks have none): the equality holds in eval mode.
    """
    w = read_dense_ffn(mlp)
    f = w.hidden_dim
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if f % num_experts:
        raise ValueError(
            f"hidden width {f} is not divisible by num_experts={num_experts}; choose "
            f"num_experts among the divisors of {f}"
        )
    e, fe = num_experts, f // num_experts
    w_in, w_out = w.w_in[0], w.w_out[0]  # [H, D], [D, F]
    b_in = None if w.b_in is None else w.b_in[0]
    b_out = None if w.b_out is None else w.b_out[0]
    bank = ExpertBank(
        e, w.dim, fe, act=w.act, glu=w.glu, bias=b_in is not None or b_out is not None
    )
    bank = bank.to(device=w_in.device, dtype=w_in.dtype)
    with torch.no_grad():
        getattr(bank, bank.in_name).copy_(_split_rows(w_in, e, w.glu))
        bank.down_proj.copy_(w_out.reshape(w.dim, e, fe).permute(1, 0, 2))
        if bank.down_proj_bias is not None:
            b_in = b_in if b_in is not None else w_in.new_zeros(w_in.shape[0])
            getattr(bank, bank.in_name + "_bias").copy_(_split_rows(b_in, e, w.glu))
            b_out = b_out if b_out is not None else w_out.new_zeros(w.dim)
            bank.down_proj_bias.copy_((b_out / e).expand(e, -1))
    return bank


def _split_rows(rows: Tensor, num_experts: int, glu: bool) -> Tensor:
    """[H, ...] hidden rows -> [E, H/E, ...]; GLU rows [gate | up] -> per expert [gate_i | up_i]."""
    if not glu:
        return rows.reshape(num_experts, -1, *rows.shape[1:])
    gate, up = rows.chunk(2, dim=0)
    gate = gate.reshape(num_experts, -1, *rows.shape[1:])
    up = up.reshape(num_experts, -1, *rows.shape[1:])
    return torch.cat([gate, up], dim=1)


def decompose_to_moe(
    mlp: nn.Module,
    num_experts: int,
    top_k: int | None = None,
    router: str | nn.Module = "uoe",
    **moe_kwargs,
) -> MoE:
    """``mlp`` as a gatelab MoE over its :func:`decompose_mlp` slices.

    ``top_k=None`` (or ``num_experts``) routes every token to every slice at weight 1
    (:class:`~gatelab.routing.AllExpertsRouter`): the layer equals ``mlp``. A smaller
    ``top_k`` uses ``router`` ("uoe": per-token top-k slices; "uoe_patch": patch-wise
    data selection; any registered router), whose gate starts untrained.
    """
    bank = decompose_mlp(mlp, num_experts)
    if top_k is None or top_k == num_experts:
        router, top_k = AllExpertsRouter(bank.dim, num_experts), num_experts
    moe = MoE(
        bank.dim, bank.hidden_dim, num_experts, top_k, router=router, experts=bank, **moe_kwargs
    )
    return moe.to(device=bank.down_proj.device, dtype=bank.down_proj.dtype)


def uoe_mlp(
    dim: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int,
    act: str = "silu",
    glu: bool = True,
    bias: bool = False,
    router: str = "uoe",
    **moe_kwargs,
) -> MoE:
    """A Union-of-MLP-Experts layer: one MLP of width ``hidden_dim`` in E routed slices.

    Each expert has width ``hidden_dim / num_experts``; each token runs ``top_k`` of them
    (router "uoe" or "uoe_patch", see :mod:`gatelab.routing.uoe`). Active FFN weights per
    token: ``top_k / num_experts`` of the dense MLP's.
    """
    if hidden_dim % num_experts:
        raise ValueError(
            f"hidden_dim={hidden_dim} is not divisible by num_experts={num_experts}; the "
            "experts are equal slices of one MLP"
        )
    bank = ExpertBank(num_experts, dim, hidden_dim // num_experts, act=act, glu=glu, bias=bias)
    return MoE(
        dim,
        hidden_dim // num_experts,
        num_experts,
        top_k,
        router=router,
        experts=bank,
        **moe_kwargs,
    )
