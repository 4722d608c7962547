"""What ``gatelab bench moe`` times on each shape: the equal-FLOP dense MLP, gatelab's MoE
through each dispatcher, HF's Mixtral block holding the very same parameters, and (CPU
training shapes) the layer's matrix products alone, a bound on the speed of a dispatcher
built on those GEMMs."""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..dispatch import native
from ..dispatch.cpu_threads import run_split
from ..dispatch.grouped import _native_split, split_few_rows
from ..experts.activation import as_activation
from ..layers import MoE
from .shapes import Shape

VARIANTS = (
    "dense",
    "gatelab_grouped",
    "gatelab_triton",
    "gatelab_loop",
    "hf_eager",
    "hf_grouped_mm",
    "gemm_bound",
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


class _ExpertGemms:
    """The matrix products of one MoE layer on one batch, in reused buffers: the router's
    logits GEMM and its two gradient GEMMs, and for each expert, on the rows the router
    sends it, the two forward and four backward GEMMs of the grouped dispatcher's split
    strategy (SwiGLU experts: gate_up [E, 2F, D], down [E, D, F]). The rows sit in expert
    order already and hold fixed random values (a GEMM's speed does not depend on them).

    The experts' GEMMs run one thread each, shared out over torch's threads largest
    expert first, where split runs them: in one C++ call per pass where split's pass is
    in C++ (``native.gemms_only``: split's loop, its GEMMs alone; forward products of up
    to ``native.ROWS_MAX`` rows take its few-row kernel where split's do), else from
    Python (``cpu_threads.run_split``). The router's GEMMs run on all threads.
    """

    def __init__(self, moe: MoE, x: Tensor):
        with torch.no_grad():
            experts = moe.router(x.reshape(-1, moe.dim)).experts
        routed = experts[experts >= 0]
        self.counts = torch.bincount(routed, minlength=moe.num_experts).tolist()
        rows, dim, ffn = routed.numel(), moe.dim, moe.hidden_dim
        self.w_router = moe.router.weight.detach()
        self.w_in = moe.experts.gate_up_proj.detach()  # [E, 2F, D]
        self.w_out = moe.experts.down_proj.detach()  # [E, D, F]
        like = {"device": x.device, "dtype": self.w_in.dtype}
        self.xs, self.gy = torch.randn(rows, dim, **like), torch.randn(rows, dim, **like)
        self.act, self.g_act = torch.randn(rows, ffn, **like), torch.empty(rows, ffn, **like)
        self.hidden = torch.empty(rows, 2 * ffn, **like)
        self.g_hidden = torch.randn(rows, 2 * ffn, **like)
        self.y, self.g_xs = torch.empty(rows, dim, **like), torch.empty(rows, dim, **like)
        self.g_w_in, self.g_w_out = torch.empty_like(self.w_in), torch.empty_like(self.w_out)
        self.g_logits = torch.randn(x.shape[0], moe.num_experts, **like)
        # Where, in what order and on how many workers split runs these experts.
        self.few = split_few_rows(self.xs, self.w_in, self.hidden, self.act, self.w_out, self.y)
        activation = as_activation(moe.experts.weights().activate)
        self.split = _native_split(activation, self.counts, self.few)

    @property
    def in_cpp(self) -> bool:
        """Whether the experts' GEMMs run in split's C++ loop (else from Python)."""
        return self.split is not None

    def forward(self, x: Tensor) -> None:
        torch.mm(x, self.w_router.t())  # the router's logits [T, E], a new tensor as there
        self._experts(backward=False)

    def backward(self, x: Tensor) -> Tensor:
        """Runs the backward GEMMs; returns the router's gradient of x [T, D]."""
        self._experts(backward=True)
        torch.mm(self.g_logits.t(), x)  # the router weight's gradient [E, D]
        return torch.mm(self.g_logits, self.w_router)

    def _experts(self, backward: bool) -> None:
        if self.split is not None:
            order, _, _, workers = self.split
            native.gemms_only(
                self.xs, self.act, self.gy, self.g_hidden, self.w_in, self.w_out,
                self.counts, order, self.hidden, self.y, self.g_act, self.g_xs,
                self.g_w_in, self.g_w_out, backward, self.few, workers,
            )  # fmt: skip
            return
        run_split(self._backward_expert if backward else self._forward_expert, self.counts)

    def _forward_expert(self, e: int, start: int, count: int) -> None:
        rows = slice(start, start + count)
        torch.mm(self.xs[rows], self.w_in[e].t(), out=self.hidden[rows])
        torch.mm(self.act[rows], self.w_out[e].t(), out=self.y[rows])

    def _backward_expert(self, e: int, start: int, count: int) -> None:
        rows = slice(start, start + count)
        gy, act, g_hidden = self.gy[rows], self.act[rows], self.g_hidden[rows]
        torch.mm(gy, self.w_out[e], out=self.g_act[rows])
        torch.mm(gy.t(), act, out=self.g_w_out[e])
        torch.mm(g_hidden.t(), self.xs[rows], out=self.g_w_in[e])
        torch.mm(g_hidden, self.w_in[e], out=self.g_xs[rows])


class _GemmsAlone(torch.autograd.Function):
    """Runs :class:`_ExpertGemms` as a layer would: forward, and backward on ``backward()``."""

    @staticmethod
    def forward(ctx, x, gemms):
        ctx.gemms = gemms
        ctx.save_for_backward(x)
        gemms.forward(x)
        return x.new_empty(x.shape)  # never written or read: no pass over [T, D]

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return ctx.gemms.backward(x), None


def gemm_bound(moe: MoE, x: Tensor) -> Variant:
    """The layer's matrix products alone on ``x``: a bound on the speed of a dispatcher
    built on these GEMMs (CPU, training shapes).

    The router's GEMMs and each expert's on the rows the router sends it for ``x``
    (:class:`_ExpertGemms`), with nothing between them: no top-k, sort, gather,
    activation or combine, and each expert's GEMMs one thread each, side by side, as
    the split strategy runs them (note 6 of ``benchmarks/cpu_notes.py`` found that
    arrangement at least as fast as two-thread GEMMs on every sweep shape). Dense time /
    this time is how close to the dense MLP such a layer can get on this machine.
    """
    gemms = _ExpertGemms(moe, x)
    return Variant(lambda inputs: _GemmsAlone.apply(inputs, gemms))


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
