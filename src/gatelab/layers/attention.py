"""Attention with an output gate (G1), grouped-query heads and rotary positions.

One module, :class:`GatedAttention`, on inputs [B, S, D]::

    q = q_proj(x), k = k_proj(x), v = v_proj(x)          # H query heads, H_kv key/value heads
    q, k = rope(qk_norm(q)), rope(qk_norm(k))            # optional QK-norm, optional RoPE
    y = SDPA(q, k, v)                                    # head h reads key/value head h // (H / H_kv)
    y = y * sigmoid(gate_proj(x))                        # G1: headwise [H] or elementwise [H, d_h]
    out = o_proj(concat_heads(y))

The RoPE helpers (:func:`rope_cache`, :func:`apply_rope`) live here so layers need nothing
from ``models``; ``gatelab.models.lm`` re-exports them.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTN_GATES = ("none", "headwise", "elementwise")

__all__ = [
    "ATTN_GATES",
    "GatedAttention",
    "apply_rope",
    "fuse_q_gate",
    "rope_cache",
    "split_q_gate",
]


# -- Rotary positions ---------------------------------------------------------------------


def rope_cache(
    head_dim: int, max_seq_len: int, theta: float = 10000.0, device=None
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [max_seq_len, head_dim] (float32) for :func:`apply_rope`.

    Channel i < head_dim / 2 is paired with channel i + head_dim / 2 and rotated by the
    angle ``position * theta ** (-2i / head_dim)`` (RoFormer's frequencies, in the
    half-split channel order of GPT-NeoX and HF Llama rather than RoFormer's interleaved one).
    """
    inv_freq = theta ** (
        -torch.arange(0, head_dim, 2, device=device, dtype=torch.float64) / head_dim
    )
    angles = torch.outer(torch.arange(max_seq_len, device=device, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [..., S, head_dim] by the first S rows of the tables (see :func:`rope_cache`)."""
    seq = x.shape[-2]
    cos, sin = cos[:seq].to(x.dtype), sin[:seq].to(x.dtype)
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


# -- The reference's fused q_proj layout --------------------------------------------------


def _gate_width(gate: str, head_dim: int) -> int:
    return {"headwise": 1, "elementwise": head_dim}[gate]


def fuse_q_gate(q: Tensor, g: Tensor, num_kv_heads: int) -> Tensor:
    """Split layout -> the reference's fused ``q_proj`` (weight [rows, D] or bias [rows]).

    ``q`` holds the H query heads in head order ([H * d_h, ...]) and ``g`` the gate rows
    ([H, ...] headwise, [H * d_h, ...] elementwise). The reference (qiuzh20/gated_attention,
    ``Qwen3Attention``) views ``q_proj(x)`` as [n_kv, -1] and splits each KV group into its
    G = H / n_kv query heads followed by their G gates, so the fused rows are, per group j:
    the rows of heads jG..jG+G-1, then the gate rows of the same heads.
    """
    per_group_q = q.reshape(num_kv_heads, -1, *q.shape[1:])
    per_group_g = g.reshape(num_kv_heads, -1, *g.shape[1:])
    return torch.cat([per_group_q, per_group_g], dim=1).reshape(-1, *q.shape[1:])


def split_q_gate(
    fused: Tensor, num_heads: int, num_kv_heads: int, head_dim: int, gate: str
) -> tuple[Tensor, Tensor]:
    """The inverse of :func:`fuse_q_gate`: (q rows in head order, gate rows in head order)."""
    group = num_heads // num_kv_heads
    width = _gate_width(gate, head_dim)
    expected = num_heads * (head_dim + width)
    if fused.shape[0] != expected:
        raise ValueError(
            f"a fused q_proj with {gate} gate for num_heads={num_heads}, head_dim={head_dim} "
            f"has {expected} rows, got {fused.shape[0]}"
        )
    per_group = fused.reshape(num_kv_heads, -1, *fused.shape[1:])
    q, g = per_group.split([group * head_dim, group * width], dim=1)
    return q.reshape(-1, *fused.shape[1:]), g.reshape(-1, *fused.shape[1:])


# -- The module ---------------------------------------------------------------------------


class GatedAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with a sigmoid gate on each head's output.

    "Gated Attention for Large Language Models: Non-linearity, Sparsity, and
    Attention-Sink-Free" (Qiu et al., Qwen team, arXiv 2505.06708), the G1 position: the
    gate ``sigmoid(x W_theta)`` is computed from the block input x (the same normed hidden
    state the queries come from), multiplies each head's SDPA output before the heads are
    concatenated and projected by ``o_proj``. ``gate="headwise"``: one scalar per head and
    token; ``"elementwise"``: one per channel; ``"none"``: plain attention.

    Grouped-query attention ("GQA", Ainslie et al., arXiv 2305.13245): ``num_kv_heads``
    key/value heads, query head h reads key/value head ``h // (num_heads / num_kv_heads)``
    (HF's ``repeat_kv`` order). ``qk_norm`` adds Qwen3's per-head RMSNorm on q and k (before
    RoPE); the gate comes from the raw projection, as in the reference. RoPE is applied
    when ``cos``/``sin`` tables (:func:`rope_cache`) are passed to ``forward``.

    Departure from the reference (qiuzh20/gated_attention): the reference fuses W_theta into
    ``q_proj``, interleaved per KV group (see :func:`fuse_q_gate`); here the query and gate
    projections are separate parameters ``q_proj`` and ``gate_proj`` in head order, so the
    query rows read the same with or without a gate and a gate can be added to (or frozen
    in) a trained model. A state dict in the reference layout (a ``q_proj.weight`` with the
    gate rows in it and no ``gate_proj``) is converted on load, and
    :meth:`reference_state_dict` writes one. ``bias`` applies to all four projections, as
    the reference's ``qkv_bias`` does.

    ``fused_qkv=True`` (ungated only) keeps q, k and v in one projection ``qkv_proj``
    (rows [q; k; v]), one GEMM, as gatelab's LM attention has always computed it; with
    ``gate="none"`` the module is then that attention exactly (the former
    ``models.lm.CausalSelfAttention``, whose ``qkv``/``proj`` state dicts load here).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        head_dim: int | None = None,
        gate: str = "elementwise",
        bias: bool = False,
        dropout: float = 0.0,
        qk_norm: bool = False,
        norm_eps: float = 1e-6,
        causal: bool = True,
        fused_qkv: bool = False,
    ):
        super().__init__()
        num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        _check_config(dim, num_heads, num_kv_heads, head_dim, gate, dropout)
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads if head_dim is None else head_dim
        self.gate, self.dropout, self.causal = gate, dropout, causal
        inner, kv = num_heads * self.head_dim, num_kv_heads * self.head_dim
        if fused_qkv and gate != "none":
            raise ValueError(
                "GatedAttention: fused_qkv=True is plain attention's layout; with a gate keep "
                "fused_qkv=False (q_proj, k_proj, v_proj and gate_proj separate)"
            )
        self.fused_qkv = fused_qkv
        if fused_qkv:  # one GEMM for q, k and v: rows [q; k; v], each in head order
            self.qkv_proj = nn.Linear(dim, inner + 2 * kv, bias=bias)
            self.q_proj = self.k_proj = self.v_proj = None
        else:
            self.q_proj = nn.Linear(dim, inner, bias=bias)
            self.k_proj = nn.Linear(dim, kv, bias=bias)
            self.v_proj = nn.Linear(dim, kv, bias=bias)
        self.gate_proj = (
            nn.Linear(dim, num_heads * _gate_width(gate, self.head_dim), bias=bias)
            if gate != "none"
            else None
        )
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=norm_eps) if qk_norm else None
        self._register_load_state_dict_pre_hook(self._accept_reference_layout)
        self._register_load_state_dict_pre_hook(self._accept_fused_qkv)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim}, gate={self.gate!r}, causal={self.causal}"
            + (", fused_qkv=True" if self.fused_qkv else "")
        )

    # -- forward --------------------------------------------------------------------------

    def _qkv(self, x: Tensor, cos: Tensor | None, sin: Tensor | None):
        b, s, _ = x.shape
        if self.fused_qkv:
            q, k, v = self._fused_qkv(x)
        else:
            q = self.q_proj(x).view(b, s, self.num_heads, self.head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if cos is not None:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _fused_qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)
        if self.num_kv_heads == self.num_heads:  # the former LM attention's exact views
            return qkv.view(b, s, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        kv = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([self.num_heads * self.head_dim, kv, kv], dim=-1)
        q = q.reshape(b, s, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return q, k, v.reshape(b, s, self.num_kv_heads, self.head_dim).transpose(1, 2)

    def gate_scores(self, x: Tensor) -> Tensor | None:
        """sigmoid(gate_proj(x)) as [B, H, S, 1] (headwise) or [B, H, S, d_h]; None ungated."""
        if self.gate_proj is None:
            return None
        b, s, _ = x.shape
        width = self.gate_proj.out_features // self.num_heads
        g = self.gate_proj(x).view(b, s, self.num_heads, width).transpose(1, 2)
        return torch.sigmoid(g)

    def forward(self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None) -> Tensor:
        """x [B, S, dim] -> [B, S, dim]; ``cos``/``sin`` from :func:`rope_cache` turn RoPE on."""
        self._check_input(x, cos, sin)
        q, k, v = self._qkv(x, cos, sin)
        y = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=self.dropout if self.training else 0.0,
            is_causal=self.causal,
            enable_gqa=self.num_kv_heads != self.num_heads,
        )
        return self._output(x, y)

    def _output(self, x: Tensor, y: Tensor) -> Tensor:
        gate = self.gate_scores(x)
        if gate is not None:
            y = y * gate
        b, _, s, _ = y.shape
        return self.o_proj(y.transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim))

    def attention_weights(
        self, x: Tensor, cos: Tensor | None = None, sin: Tensor | None = None
    ) -> Tensor:
        """The softmax attention probabilities [B, H, S, S] (float32) the forward uses.

        Computed explicitly (SDPA does not return them), for inspection: the attention
        sink is the weight on key position 0.
        """
        self._check_input(x, cos, sin)
        q, k, _ = self._qkv(x, cos, sin)
        if not self.fused_qkv or self.num_kv_heads != self.num_heads:
            k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) / math.sqrt(self.head_dim)
        if self.causal:
            s = x.shape[1]
            future = torch.ones(s, s, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)

    def _check_input(self, x: Tensor, cos: Tensor | None, sin: Tensor | None) -> None:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"GatedAttention expects x [batch, seq, dim={self.dim}], got {shape}")
        if (cos is None) != (sin is None):
            raise ValueError("pass both cos and sin (from rope_cache) or neither")
        if cos is not None and (cos.shape[-1] != self.head_dim or cos.shape[0] < x.shape[1]):
            raise ValueError(
                f"RoPE tables must be [>= seq={x.shape[1]}, head_dim={self.head_dim}], got "
                f"{tuple(cos.shape)}; build them with rope_cache(head_dim, max_seq_len)"
            )

    # -- the reference's layout -----------------------------------------------------------

    def reference_state_dict(self) -> dict[str, Tensor]:
        """This module's state dict in the reference's layout (gate rows fused into
        ``q_proj``, interleaved per KV group); :meth:`load_state_dict` reads it back."""
        state = {k: v.detach().clone() for k, v in self.state_dict().items()}
        if self.gate_proj is None:
            return state
        for kind in ("weight", "bias"):
            g = state.pop(f"gate_proj.{kind}", None)
            if g is not None:
                q = state[f"q_proj.{kind}"]
                state[f"q_proj.{kind}"] = fuse_q_gate(q, g, self.num_kv_heads)
        return state

    def _accept_fused_qkv(self, state_dict, prefix, *args, **kwargs) -> None:
        # gatelab's former LM attention (CausalSelfAttention, before issue 14): one fused
        # ``qkv`` [3 * H * d_h, D] (q rows, then k, then v, each in head order) and ``proj``.
        if self.gate_proj is not None or self.num_kv_heads != self.num_heads:
            return
        for kind in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}qkv.{kind}", None)
            if fused is not None and self.fused_qkv:
                state_dict[f"{prefix}qkv_proj.{kind}"] = fused
            elif fused is not None:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), fused.chunk(3), strict=True):
                    state_dict[f"{prefix}{name}.{kind}"] = part
            proj = state_dict.pop(f"{prefix}proj.{kind}", None)
            if proj is not None:
                state_dict[f"{prefix}o_proj.{kind}"] = proj

    def _accept_reference_layout(self, state_dict, prefix, *args, **kwargs) -> None:
        # A fused q_proj (more rows than the query heads) and no gate_proj: split it.
        key = f"{prefix}q_proj.weight"
        if (
            self.gate_proj is None
            or self.fused_qkv
            or key not in state_dict
            or f"{prefix}gate_proj.weight" in state_dict
        ):
            return
        if state_dict[key].shape[0] == self.q_proj.out_features:
            return
        for kind in ("weight", "bias"):
            fused = state_dict.pop(f"{prefix}q_proj.{kind}", None)
            if fused is not None:
                q, g = split_q_gate(
                    fused, self.num_heads, self.num_kv_heads, self.head_dim, self.gate
                )
                state_dict[f"{prefix}q_proj.{kind}"] = q
                state_dict[f"{prefix}gate_proj.{kind}"] = g


def _check_config(
    dim: int, num_heads: int, num_kv_heads: int, head_dim: int | None, gate: str, dropout: float
) -> None:
    for name, value in (("dim", dim), ("num_heads", num_heads), ("num_kv_heads", num_kv_heads)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"GatedAttention: {name} must be a positive int, got {value!r}")
    if head_dim is None and dim % num_heads:
        raise ValueError(
            f"GatedAttention: dim={dim} is not divisible by num_heads={num_heads}; choose "
            "num_heads dividing dim, or pass head_dim explicitly"
        )
    if head_dim is not None and (not isinstance(head_dim, int) or head_dim < 1):
        raise ValueError(f"GatedAttention: head_dim must be a positive int, got {head_dim!r}")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"GatedAttention: num_heads={num_heads} is not divisible by num_kv_heads="
            f"{num_kv_heads}; each key/value head serves a whole group of query heads"
        )
    if gate not in ATTN_GATES:
        raise ValueError(f"GatedAttention: gate must be one of {ATTN_GATES}, got {gate!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"GatedAttention: dropout must lie in [0, 1), got {dropout}")
