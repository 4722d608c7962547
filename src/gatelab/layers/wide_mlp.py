"""An MoE layer is one wide MLP whose hidden units are masked by the routing (MoE-X).

Concatenating the hidden units of E experts of width F gives one MLP of width E * F. A
token routed to expert e with weight g uses units e*F .. (e+1)*F - 1 scaled by g and no
other unit, so

    MoE(x) = sum_slots g_e * (W_out,e act(W_in,e x + b_in,e) + b_out,e)
           = W_out (m(x) * act(W_in x + b_in)) + sum_e g_e b_out,e

with W_in, W_out, b_in the experts' weights stacked along the hidden axis and m(x) the
[E * F] mask that holds g_e on expert e's units. :func:`routing_mask` turns a Routing into that mask and
:func:`mask_to_routing` a mask back into a Routing; the weight converters
(``moe_to_wide``, ``wide_to_moe``) live in :mod:`gatelab.convert.wide`.
:func:`moex_layer` builds MoE-X's layer: ReLU experts routed by expected sparsity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import GLU, ExpertBank, Plain
from ..legacy import moved
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


__getattr__ = moved(
    __name__, {"moe_to_wide": "gatelab.convert.wide", "wide_to_moe": "gatelab.convert.wide"}
)
