"""Union of Experts (UoE): a dense MLP cut into experts, and attention heads as experts.

"Union of Experts: Adapting Hierarchical Routing to Equivalently Decomposed Transformer"
(Yang et al., arXiv 2503.02495).

- :func:`decompose_mlp`: the equivalent decomposition. W1 is split by columns (hidden
  units) and W2 by rows, as Megatron's tensor parallelism splits an MLP: expert i owns
  hidden units i*F/E .. (i+1)*F/E - 1. The sum of all E experts is the dense MLP.
- :func:`decompose_to_moe`: that bank inside a gatelab :class:`~gatelab.layers.MoE`, with
  every expert on at weight 1 (exact) or routed (:mod:`gatelab.routing.uoe`).
- :func:`uoe_mlp`: a trainable Union-of-MLP-Experts layer (UoME) of total width
  ``hidden_dim`` built from scratch.
- :class:`SelectiveMultiHeadAttention`: SMHA, heads as experts; a token computes only the
  heads it selects.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts import ACTIVATION_NAMES, ExpertBank
from ..routing.uoe import AllExpertsRouter, unit_weights
from .moe import MoE

# nn activation modules an nn.Sequential MLP may use, by gatelab activation name.
_ACT_MODULES = {nn.ReLU: "relu", nn.SiLU: "silu"}


class DenseMLPWeights:
    """A dense two-layer MLP read as y = W2 act(W1 x + b1) + b2 (GLU: W1 = [W_gate; W_up]).

    w_in [H, D] (H = 2F for GLU, gate rows first), w_out [D, F], b_in [H] or None,
    b_out [D] or None, act a gatelab activation name, glu a bool.
    """

    def __init__(self, w_in, w_out, b_in, b_out, act: str, glu: bool):
        self.w_in, self.w_out, self.b_in, self.b_out = w_in, w_out, b_in, b_out
        self.act, self.glu = act, glu

    @property
    def hidden_dim(self) -> int:
        return self.w_out.shape[1]

    @property
    def dim(self) -> int:
        return self.w_in.shape[1]


def dense_mlp_weights(mlp: nn.Module) -> DenseMLPWeights:
    """Read a dense MLP: gatelab's LM ``SwiGLU`` or :class:`GluMlp` (``gate_up_proj``,
    ``down_proj``), :class:`Mlp` (``fc1``, ``fc2``), or ``nn.Sequential(Linear, act, Linear)``.
    """
    if hasattr(mlp, "gate_up_proj") and hasattr(mlp, "down_proj"):
        act = getattr(mlp, "act", "silu")  # the LM's SwiGLU is silu and has no .act
        gu, down = mlp.gate_up_proj, mlp.down_proj
        return DenseMLPWeights(gu.weight, down.weight, gu.bias, down.bias, _known(act), True)
    if hasattr(mlp, "fc1") and hasattr(mlp, "fc2"):
        fc1, fc2 = mlp.fc1, mlp.fc2
        return DenseMLPWeights(fc1.weight, fc2.weight, fc1.bias, fc2.bias, _known(mlp.act), False)
    if isinstance(mlp, nn.Sequential):
        parts = [m for m in mlp if not isinstance(m, nn.Dropout | nn.Identity)]
        if len(parts) == 3 and isinstance(parts[0], nn.Linear) and isinstance(parts[2], nn.Linear):
            up, act, down = parts
            return DenseMLPWeights(
                up.weight, down.weight, up.bias, down.bias, _act_name(act), False
            )
    raise TypeError(
        f"cannot decompose {type(mlp).__name__}: expected gatelab's SwiGLU or GluMlp "
        "(gate_up_proj, down_proj), Mlp (fc1, fc2), or nn.Sequential(Linear, activation, Linear)"
    )


def _known(act: str) -> str:
    if act not in ACTIVATION_NAMES:
        raise ValueError(
            f"cannot decompose an MLP with act={act!r} into an expert bank; bank activations "
            f"are {', '.join(ACTIVATION_NAMES)}"
        )
    return act


def _act_name(module: nn.Module) -> str:
    if isinstance(module, nn.GELU):
        return "gelu_tanh" if module.approximate == "tanh" else "gelu"
    for kind, name in _ACT_MODULES.items():
        if isinstance(module, kind):
            return name
    raise ValueError(
        f"cannot decompose an MLP with activation {type(module).__name__}; use nn.ReLU, "
        "nn.SiLU or nn.GELU"
    )


def decompose_mlp(mlp: nn.Module, num_experts: int) -> ExpertBank:
    """An :class:`ExpertBank` of ``num_experts`` slices whose sum is ``mlp`` exactly.

    Expert i owns hidden units i*F/E .. (i+1)*F/E - 1: those rows of W1 (of W_gate and of
    W_up for a GLU) and of b1, and those columns of W2. The output bias b2 is not a hidden
    unit; each expert carries b2 / E, so the sum of all E experts adds b2 once (the union
    is exact up to rounding; an expert subset adds its share, k/E of b2). The bank is a
    copy in the MLP's dtype and device; training it does not touch ``mlp``. The MLP's
    dropout is not carried over (banks have none): the equality holds in eval mode.
    """
    w = dense_mlp_weights(mlp)
    f = w.hidden_dim
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts must be a positive int, got {num_experts!r}")
    if f % num_experts:
        raise ValueError(
            f"hidden width {f} is not divisible by num_experts={num_experts}; choose "
            f"num_experts among the divisors of {f}"
        )
    e, fe = num_experts, f // num_experts
    bank = ExpertBank(
        e, w.dim, fe, act=w.act, glu=w.glu, bias=w.b_in is not None or w.b_out is not None
    )
    bank = bank.to(device=w.w_in.device, dtype=w.w_in.dtype)
    with torch.no_grad():
        getattr(bank, bank.in_name).copy_(_split_rows(w.w_in, e, w.glu))
        bank.down_proj.copy_(w.w_out.reshape(w.dim, e, fe).permute(1, 0, 2))
        if bank.down_proj_bias is not None:
            b_in = w.b_in if w.b_in is not None else w.w_in.new_zeros(w.w_in.shape[0])
            getattr(bank, bank.in_name + "_bias").copy_(_split_rows(b_in, e, w.glu))
            b_out = w.b_out if w.b_out is not None else w.w_out.new_zeros(w.dim)
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


__all__ = [
    "DenseMLPWeights",
    "SelectiveMultiHeadAttention",
    "decompose_mlp",
    "decompose_to_moe",
    "dense_mlp_weights",
    "uoe_mlp",
]
