"""UoE's Selective Multi-Head Attention: attention heads as experts.

"Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer"
(Yang et al., arXiv 2503.02495). :class:`SelectiveMultiHeadAttention` (SMHA): a token
computes only the heads it selects. UoE's MLP side (the equivalent decomposition of a dense
MLP into experts, ``decompose_mlp``, ``decompose_to_moe``, ``uoe_mlp``) converts weights
and lives in :mod:`gatelab.convert.uoe`; the old names here still import, with a warning.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..legacy import moved
from ..routing.uoe import unit_weights


class SelectiveMultiHeadAttention(nn.Module):
    """Selective Multi-Head Attention (SMHA): heads are experts, a token computes its top-k.

    UoE (arXiv 2503.02495) decomposes attention by heads, as tensor parallelism does, and
    routes tokens to heads with a SwitchGate (n_experts = num_heads, top_k = num_heads / 2
    in the paper). Here a gate softmax(x W_g) over heads picks ``top_k`` heads per token;
    head h then runs only on the tokens that chose it: their q, k, v projections, QK^T over
    those tokens (causal by original position when ``causal``) and AV. Each token's output
    is sum over its heads of weight * o_h W_o,h (+ the output bias).

    Choices the notes leave open (documented, tested): a head's keys are the tokens that
    selected it (the reference computes QK^T only for routed tokens); the combine weight is
    exactly 1 in value with a straight-through score (:func:`gatelab.routing.uoe.unit_weights`),
    so selecting all heads gives standard multi-head attention exactly. The projections
    use ``nn.MultiheadAttention``'s layout (``qkv`` = in_proj [q; k; v], ``proj`` =
    out_proj). Parameters: 4 * dim^2 + dim * num_heads (+ 4 * dim with ``bias``).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        top_k: int | None = None,
        bias: bool = True,
        causal: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        for name, value in (("dim", dim), ("num_heads", num_heads)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if dim % num_heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={num_heads}")
        top_k = max(num_heads // 2, 1) if top_k is None else top_k
        if not 1 <= top_k <= num_heads:
            raise ValueError(f"top_k must lie in [1, num_heads={num_heads}], got {top_k}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        self.dim, self.num_heads, self.top_k = dim, num_heads, top_k
        self.head_dim, self.causal, self.dropout = dim // num_heads, causal, dropout
        self.gate = nn.Linear(dim, num_heads, bias=False)
        self.qkv = nn.Linear(dim, 3 * dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.last_selection: Tensor | None = None

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, top_k={self.top_k}, causal={self.causal}"
        )

    def select(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Per token: selected [B, S, H] bool and combine weights [B, S, H] (0 off the heads)."""
        scores = self.gate(x).float().softmax(dim=-1)
        top, heads = scores.topk(self.top_k, dim=-1)
        selected = torch.zeros_like(scores, dtype=torch.bool).scatter(-1, heads, True)
        weights = torch.zeros_like(scores).scatter(-1, heads, unit_weights(top))
        return selected, weights.to(x.dtype)

    def forward(self, x: Tensor) -> Tensor:
        """x [B, S, dim] -> [B, S, dim]."""
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"SelectiveMultiHeadAttention expects [B, S, dim={self.dim}], got {shape}"
            )
        selected, weights = self.select(x)
        self.last_selection = selected.detach()
        out = x.new_zeros(x.shape)
        for h in range(self.num_heads):
            if selected[..., h].any():
                out = out + self._head(x, h, selected[..., h], weights[..., h])
        if self.proj.bias is not None:
            out = out + self.proj.bias
        return out

    def _head(self, x: Tensor, h: int, mask: Tensor, weight: Tensor) -> Tensor:
        """Head h on the tokens of ``mask`` [B, S] only, scattered back to [B, S, dim]."""
        b, s, d = x.shape
        n = int(mask.sum(1).max())
        # Selected positions first, in order (stable sort), then padding up to n.
        idx = torch.sort((~mask).to(torch.int8), dim=1, stable=True).indices[:, :n]
        valid = mask.gather(1, idx)
        xs = x.gather(1, idx.unsqueeze(-1).expand(b, n, d))
        hd = self.head_dim
        rows = [slice(i * d + h * hd, i * d + (h + 1) * hd) for i in range(3)]
        w, bias = self.qkv.weight, self.qkv.bias
        q, k, v = (F.linear(xs, w[r], None if bias is None else bias[r]) for r in rows)
        allowed = valid.unsqueeze(1).expand(b, n, n)
        if self.causal:
            allowed = allowed & (idx.unsqueeze(1) <= idx.unsqueeze(2))
        # Padding rows see only themselves (no NaN); their outputs are zeroed below.
        allowed = allowed | torch.eye(n, dtype=torch.bool, device=x.device)
        drop = self.dropout if self.training else 0.0
        o = F.scaled_dot_product_attention(
            q.unsqueeze(1),
            k.unsqueeze(1),
            v.unsqueeze(1),
            attn_mask=allowed.unsqueeze(1),
            dropout_p=drop,
        ).squeeze(1)
        o = F.linear(o, self.proj.weight[:, h * hd : (h + 1) * hd])
        o = o * (weight.gather(1, idx) * valid).unsqueeze(-1)
        return x.new_zeros(x.shape).scatter_add(1, idx.unsqueeze(-1).expand(b, n, d), o)


__all__ = ["SelectiveMultiHeadAttention"]

# Moved in issue 14; the two readers became gatelab.experts.read_dense_ffn (one expert in
# bank layout: ExpertWeights with [1, ...] shapes).
__getattr__ = moved(
    __name__,
    {
        "decompose_mlp": "gatelab.convert.uoe",
        "decompose_to_moe": "gatelab.convert.uoe",
        "uoe_mlp": "gatelab.convert.uoe",
        "dense_mlp_weights": "gatelab.experts:read_dense_ffn",
        "DenseMLPWeights": "gatelab.experts:ExpertWeights",
    },
)
