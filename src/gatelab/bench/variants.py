"""What ``gatelab bench moe`` times on each shape: the equal-FLOP dense MLP, gatelab's MoE
through each dispatcher, and HF's Mixtral block holding the very same parameters."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MoE
from .shapes import Shape

VARIANTS = (
    "dense",
    "gatelab_grouped",
    "gatelab_triton",
    "gatelab_loop",
    "hf_eager",
    "hf_grouped_mm",
)
MOE_VARIANTS = VARIANTS[1:]
COMPILED_VARIANTS = ("dense_compiled", "gatelab_grouped_compiled", "hf_grouped_mm_compiled")
"""Timed with ``--compile``: the eager variant of the name without ``_compiled``, through
``torch.compile`` (inductor, ``fullgraph=True``: a graph break fails the run)."""


@dataclass
class Variant:
    """Something to time: ``forward(x [T, D]) -> [T, D]`` and the parameters it trains."""

    forward: Callable[[Tensor], Tensor]
    params: list[Tensor] = field(default_factory=list)


def dense_mlp(shape: Shape, device: str, dtype: torch.dtype) -> Variant:
    """The equal-FLOP dense baseline: a SwiGLU MLP of hidden width k*F."""
    hidden = shape.top_k * shape.hidden_dim

    def init(rows: int, cols: int) -> nn.Parameter:
        bound = 1 / math.sqrt(cols)  # nn.Linear's default scale
        w = torch.empty(rows, cols, device=device, dtype=dtype).uniform_(-bound, bound)
        return nn.Parameter(w)

    gate_up, down = init(2 * hidden, shape.dim), init(shape.dim, hidden)

    def forward(x: Tensor) -> Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    return Variant(forward, [gate_up, down])


def build_gatelab_moe(shape: Shape, device: str, dtype: torch.dtype) -> MoE:
    """gatelab's MoE with Mixtral routing (softmax, top-k, renormalised), grouped dispatch."""
    with torch.device(device):
        moe = MoE(
            shape.dim,
            shape.hidden_dim,
            shape.num_experts,
            shape.top_k,
            router="topk",
            router_kwargs={"normalize": True},
            dispatcher="grouped",
        )
    return moe.to(dtype).eval()


def gatelab_grouped(moe: MoE) -> Variant:
    """The layer as built: grouped dispatch (sort by expert, grouped GEMMs, combine)."""
    return Variant(moe, list(moe.parameters()))


def gatelab_loop(moe: MoE) -> Variant:
    """The same router and experts (shared parameters) through the loop dispatcher."""
    return _redispatched(moe, "loop")


def gatelab_triton(moe: MoE) -> Variant:
    """The same router and experts (shared parameters) through the triton dispatcher."""
    return _redispatched(moe, "triton")


def _redispatched(moe: MoE, dispatcher: str) -> Variant:
    """An MoE sharing ``moe``'s router and experts (the same Parameters), run by
    ``dispatcher``."""
    layer = MoE(
        moe.dim,
        moe.hidden_dim,
        moe.num_experts,
        moe.top_k,
        router=moe.router,
        experts=moe.experts,
        dispatcher=dispatcher,
    ).eval()
    return Variant(layer, list(layer.parameters()))


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def hf_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def hf_block(moe: MoE, implementation: str) -> nn.Module:
    """A Mixtral MoE block that holds ``moe``'s own parameters, run by ``implementation``.

    The router weight [E, D] and the experts' ``gate_up_proj`` [E, 2F, D] (gate rows first)
    and ``down_proj`` [E, D, F] have the same layout in both libraries, so the block takes
    the very same Parameter objects: no copy, and gradients land in the same ``.grad``.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=moe.dim,
        intermediate_size=moe.hidden_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    config._experts_implementation = implementation
    with torch.device("meta"):  # allocate nothing: every parameter is replaced below
        block = MixtralSparseMoeBlock(config)
    block.gate.weight = moe.router.weight
    block.experts.gate_up_proj = moe.experts.gate_up_proj
    block.experts.down_proj = moe.experts.down_proj
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"MixtralSparseMoeBlock has tensors gatelab did not fill: {left}")
    return block.eval()


def hf_eager(moe: MoE) -> Variant:
    """HF's reference experts loop (``experts_implementation="eager"``)."""
    block = hf_block(moe, "eager")
    return Variant(lambda x: block(x.unsqueeze(0)).squeeze(0), list(block.parameters()))


def hf_grouped_mm(moe: MoE) -> Variant:
    """HF's default experts implementation: argsort + ``grouped_mm``."""
    block = hf_block(moe, "grouped_mm")
    return Variant(lambda x: block(x.unsqueeze(0)).squeeze(0), list(block.parameters()))


def compiled(variant: Variant, backend: str = "inductor") -> Variant:
    """``variant`` through ``torch.compile`` with the same parameters; one static graph per
    shape (``dynamic=False``), compiled on its first call."""
    forward = torch.compile(variant.forward, fullgraph=True, dynamic=False, backend=backend)
    return Variant(forward, variant.params)
