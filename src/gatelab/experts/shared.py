"""Shared experts: dense MLPs every token passes through beside the routed experts."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .bank import activation


class SharedExpert(nn.Module):
    """A dense GLU (or plain) MLP, optionally scaled by a per-token sigmoid gate.

    ``gated=True`` is Qwen2-MoE's shared expert: sigmoid(x w_g) * MLP(x) with
    ``shared_expert_gate`` = Linear(D, 1, bias=False). DeepSeek's shared experts are
    ungated (several of them are one MLP of their summed width).
    Parameter names follow HF (``gate_proj``, ``up_proj``, ``down_proj``).
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: str = "silu",
        glu: bool = True,
        bias: bool = False,
        gated: bool = False,
    ):
        super().__init__()
        self.act_fn = activation(act)
        self.glu = glu
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias) if glu else None
        self.up_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if gated else None

    def forward(self, x: Tensor) -> Tensor:
        up = self.up_proj(x)
        hidden = self.act_fn(self.gate_proj(x)) * up if self.glu else self.act_fn(up)
        out = self.down_proj(hidden)
        if self.shared_expert_gate is not None:
            out = torch.sigmoid(self.shared_expert_gate(x)) * out
        return out
