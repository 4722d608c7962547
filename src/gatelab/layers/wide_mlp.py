"""An MoE layer is one wide MLP whose hidden units are masked by the routing (MoE-X).

Concatenating the hidden units of E experts of width F gives one MLP of width E * F. A
token routed to expert e with weight g uses units e*F .. (e+1)*F - 1 scaled by g and no
other unit, so

    MoE(x) = sum_slots g_e * (W_out,e act(W_in,e x + b_in,e) + b_out,e)
           = W_out (m(x) * act(W_in x + b_in)) + sum_e g_e b_out,e

with W_in, W_out, b_in the experts' weights stacked along the hidden axis and m(x) the
[E * F] mask that holds g_e on expert e's units. :func:`moe_to_wide` and
:func:`routing_mask` export an MoE to this form, :func:`wide_to_moe` and
:func:`mask_to_routing` import it back; the round trip is exact (tested in float64).
:func:`moex_layer` builds MoE-X's layer: ReLU experts routed by expected sparsity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import GLU, ExpertBank, Plain
from ..routing import EMPTY, Routing
from .moe import MoE


class WideMLP(nn.Module):
    """One MLP of width ``num_blocks * block_dim`` whose hidden units a per-token mask scales.

    "Mixture of Experts Made Intrinsically Interpretable" (Yang et al., arXiv 2503.07639)
    rewrites an MoE layer as such a wide, sparsely activated MLP; this module is that MLP.

    Args:
        dim: D. num_blocks: E, the experts. block_dim: F, each expert's width.
        act, glu: the activation; GLU units are act(gate) * up, masked after the product.
        bias: an input bias per hidden row and an output bias per block (``block_bias``
            [E, D]): an expert's output bias enters scaled by its block's gate, which is
            what makes the form exact for experts with biases.

    Parameters follow the expert bank's layout with the expert axis folded into the hidden
    axis: ``gate_up_proj`` [2 E F, D] (all gate rows, then all up rows) or ``up_proj``
    [E F, D], ``down_proj`` [D, E F], ``*_bias``.
    """

    def __init__(
        self,
        dim: int,
        num_blocks: int,
        block_dim: int,
        act: str = "relu",
        glu: bool = False,
        bias: bool = False,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("num_blocks", num_blocks), ("block_dim", block_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.dim, self.num_blocks, self.block_dim = dim, num_blocks, block_dim
        self.act, self.glu = act, glu
        self.activation = GLU(act) if glu else Plain(act)
        width = num_blocks * block_dim
        rows = 2 * width if glu else width
        self.in_name = "gate_up_proj" if glu else "up_proj"
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(rows, dim)))
        self.down_proj = nn.Parameter(torch.empty(dim, width))
        self.in_bias = nn.Parameter(torch.zeros(rows)) if bias else None
        self.block_bias = nn.Parameter(torch.zeros(num_blocks, dim)) if bias else None
        nn.init.uniform_(self.w_in, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
        nn.init.uniform_(self.down_proj, -1 / math.sqrt(block_dim), 1 / math.sqrt(block_dim))

    @property
    def width(self) -> int:
        return self.num_blocks * self.block_dim

    @property
    def w_in(self) -> Tensor:
        return getattr(self, self.in_name)

    def extra_repr(self) -> str:
        kind = f"glu({self.act})" if self.glu else self.act
        return f"dim={self.dim}, num_blocks={self.num_blocks}, block_dim={self.block_dim}, {kind}"

    def hidden(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """The masked hidden activations [..., E F] (unmasked when ``mask`` is None)."""
        h = self.activation(F.linear(x, self.w_in, self.in_bias))
        return h if mask is None else h * self._check_mask(mask, x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [..., D] -> [..., D]; ``mask`` [..., E F] scales each hidden unit per token.

        Without biases any unit mask works. With ``block_bias`` the mask must be constant
        within each block (an expert's units share its gate), since that gate also scales
        the block's output bias; None means every gate is 1 (the dense wide MLP).
        """
        if x.shape[-1] != self.dim:
            raise ValueError(f"WideMLP input must be [..., dim={self.dim}], got {tuple(x.shape)}")
        y = F.linear(self.hidden(x, mask), self.down_proj)
        if self.block_bias is not None:
            gates = x.new_ones(*x.shape[:-1], self.num_blocks) if mask is None else None
            if gates is None:
                gates = block_gates(mask.to(x.dtype), self.block_dim)
            y = y + gates @ self.block_bias
        return y

    def _check_mask(self, mask: Tensor, x: Tensor) -> Tensor:
        if tuple(mask.shape) != (*x.shape[:-1], self.width):
            raise ValueError(
                f"mask must be [..., num_blocks * block_dim = {self.width}] matching the input "
                f"{tuple(x.shape)}, got {tuple(mask.shape)}"
            )
        return mask.to(x.dtype)


def block_gates(mask: Tensor, block_dim: int) -> Tensor:
    """[..., E] gate of each block of a block-constant mask [..., E F]; raises otherwise."""
    blocks = mask.unflatten(-1, (-1, block_dim))
    gates = blocks[..., 0]
    if not torch.equal(blocks, gates.unsqueeze(-1).expand_as(blocks)):
        raise ValueError(
            "the mask is not constant within each block of block_dim units, so it is not an "
            "expert routing: give every unit of an expert that expert's gate"
        )
    return gates


def routing_mask(routing: Routing, block_dim: int) -> Tensor:
    """[T, E F]: each token's routing weight on the units of its experts, 0 elsewhere
    (empty slots contribute nothing)."""
    return routing.dense_weights().repeat_interleave(block_dim, dim=1)


def mask_to_routing(mask: Tensor, block_dim: int, num_slots: int | None = None) -> Routing:
    """The Routing a block-constant mask [T, E F] encodes: the non-zero blocks of each token,
    in expert order, with their gates as weights; ``EMPTY`` fills the remaining slots.

    ``num_slots`` (K) defaults to the largest number of non-zero blocks of any token (at
    least 1); a token with more non-zero blocks than K is an error. No router produced this
    routing, so logits and scores both hold the gates.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [tokens, num_blocks * block_dim], got {tuple(mask.shape)}")
    if mask.shape[1] % block_dim:
        raise ValueError(f"mask width {mask.shape[1]} is not a multiple of block_dim={block_dim}")
    gates = block_gates(mask, block_dim)
    used = gates != 0
    counts = used.sum(dim=1)
    need = int(counts.max()) if counts.numel() else 0
    k = max(need, 1) if num_slots is None else num_slots
    if k < need:
        raise ValueError(
            f"a token uses {need} blocks but num_slots={k}; raise num_slots to at least {need}"
        )
    if k > gates.shape[1]:
        raise ValueError(f"num_slots={k} exceeds the {gates.shape[1]} blocks")
    ids = torch.arange(gates.shape[1], device=mask.device).expand_as(gates)
    # Sort the used blocks first (stable, so in expert order), then cut to k slots.
    order = torch.argsort((~used).to(torch.int8), dim=1, stable=True)[:, :k]
    valid = used.gather(1, order)
    experts = torch.where(valid, ids.gather(1, order), torch.full_like(order, EMPTY))
    weights = torch.where(valid, gates.gather(1, order), torch.zeros_like(order, dtype=gates.dtype))
    return Routing(gates.float(), gates.float(), experts, weights)


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


def moex_layer(
    dim: int,
    hidden_dim: int,
    num_experts: int,
    top_k: int = 2,
    bias: bool = False,
    router_kwargs: dict | None = None,
    **moe_kwargs,
) -> MoE:
    """MoE-X's layer (arXiv 2503.07639): plain ReLU experts and the sparsity-aware router
    (``"moex"``), which the MoE layer binds to them. ``moe_kwargs`` go to :class:`MoE`."""
    return MoE(
        dim,
        hidden_dim,
        num_experts,
        top_k,
        router="moex",
        experts=ExpertBank(num_experts, dim, hidden_dim, act="relu", glu=False, bias=bias),
        router_kwargs=router_kwargs,
        **moe_kwargs,
    )
