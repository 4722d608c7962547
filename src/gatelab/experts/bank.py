"""Expert weight banks stored fused like HF transformers v5.

GLU experts keep ``gate_up_proj`` [E, 2F, D] (gate rows first, then up rows) and
``down_proj`` [E, D, F]; plain experts keep ``up_proj`` [E, F, D] and ``down_proj``.
Optional biases are ``*_bias`` [E, rows]. Dispatchers read a bank through
:class:`ExpertWeights`, which HF experts modules can produce too.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..registry import Registry
from .activation import GLU, ExpertActivation, Plain

EXPERT_BANKS: Registry[type[nn.Module]] = Registry("expert bank")


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The elementwise function registered under ``name`` ("silu", "gelu", ...)."""
    return Plain(name).fn


class ExpertWeights(NamedTuple):
    """What a dispatcher needs to run E experts: y = w_out @ activate(w_in @ x + b_in) + b_out.

    w_in: [E, H, D] (H = 2F for GLU experts); w_out: [E, D, F]; b_in: [E, H] or None;
    b_out: [E, D] or None; activate maps [N, H] -> [N, F]: an
    :class:`~gatelab.experts.activation.ExpertActivation`, or any callable (differentiated
    by autograd).
    """

    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    activate: ExpertActivation | Callable[[Tensor], Tensor]

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def dim(self) -> int:
        return self.w_in.shape[2]

    @property
    def hidden_dim(self) -> int:
        """F, each expert's hidden width (the columns of ``w_out``)."""
        return self.w_out.shape[2]

    @property
    def glu(self) -> bool:
        """True for gated experts (``w_in`` holds gate rows, then up rows)."""
        return isinstance(self.activate, GLU)

    @property
    def act(self) -> str | None:
        """The activation's gatelab name ("silu", ...); None for a bare callable."""
        return getattr(self.activate, "name", None)

    def check(self) -> ExpertWeights:
        """Raise a clear error when the bank's shapes do not fit together."""
        if self.w_in.dim() != 3 or self.w_out.dim() != 3:
            raise ValueError(
                f"expert weights must be 3-D [E, rows, cols], got w_in {tuple(self.w_in.shape)} "
                f"and w_out {tuple(self.w_out.shape)}"
            )
        e, _, d = self.w_in.shape
        if self.w_out.shape[0] != e or self.w_out.shape[1] != d:
            raise ValueError(
                f"down_proj {tuple(self.w_out.shape)} does not match gate_up/up "
                f"{tuple(self.w_in.shape)}: expected [{e}, {d}, hidden_dim]"
            )
        for name, bias, rows in (("b_in", self.b_in, self.w_in.shape[1]), ("b_out", self.b_out, d)):
            if bias is not None and tuple(bias.shape) != (e, rows):
                raise ValueError(f"{name} has shape {tuple(bias.shape)}, expected [{e}, {rows}]")
        return self


class ExpertBank(nn.Module):
    """E two-layer MLP experts in fused [E, ...] parameters (HF v5 layout).

    Args:
        num_experts, dim, hidden_dim: E, D and F.
        act: activation name ("silu", "gelu", "gelu_tanh", "relu").
        glu: gated experts act(x W_gate) * (x W_up) when True (SwiGLU with act="silu"),
            plain act(x W_up) otherwise.
        bias: add per-expert biases to both projections.
    """

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        act: str = "silu",
        glu: bool = True,
        bias: bool = False,
    ):
        super().__init__()
        for name, value in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.act, self.glu = act, glu
        self.activation = GLU(act) if glu else Plain(act)
        rows = 2 * hidden_dim if glu else hidden_dim
        self.in_name = "gate_up_proj" if glu else "up_proj"
        self.register_parameter(self.in_name, nn.Parameter(torch.empty(num_experts, rows, dim)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        if bias:
            self.register_parameter(
                self.in_name + "_bias", nn.Parameter(torch.zeros(num_experts, rows))
            )
            self.down_proj_bias = nn.Parameter(torch.zeros(num_experts, dim))
        else:
            self.register_parameter(self.in_name + "_bias", None)
            self.down_proj_bias = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # nn.Linear's default, per expert: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        w_in = getattr(self, self.in_name)
        nn.init.uniform_(w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        bound = 1 / math.sqrt(self.hidden_dim)
        nn.init.uniform_(self.down_proj, -bound, bound)

    def extra_repr(self) -> str:
        kind = f"glu({self.act})" if self.glu else self.act
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, {kind}"
        )

    def weights(self) -> ExpertWeights:
        return ExpertWeights(
            getattr(self, self.in_name),
            self.down_proj,
            getattr(self, self.in_name + "_bias"),
            self.down_proj_bias,
            self.activation,
        )

    def forward_expert(self, index: int, x: Tensor) -> Tensor:
        """Run expert ``index`` alone on x [N, D] (a reference, and for inspection)."""
        w = self.weights()
        h = F.linear(x, w.w_in[index], None if w.b_in is None else w.b_in[index])
        return F.linear(w.activate(h), w.w_out[index], None if w.b_out is None else w.b_out[index])


@EXPERT_BANKS.register("glu")
def glu_bank(num_experts: int, dim: int, hidden_dim: int, act: str = "silu", bias: bool = False):
    return ExpertBank(num_experts, dim, hidden_dim, act=act, glu=True, bias=bias)


@EXPERT_BANKS.register("mlp")
def mlp_bank(num_experts: int, dim: int, hidden_dim: int, act: str = "gelu", bias: bool = False):
    return ExpertBank(num_experts, dim, hidden_dim, act=act, glu=False, bias=bias)
