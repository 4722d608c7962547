"""Windowed retention with Manhattan-distance decay and the gates of Gated-SwinRMT.

"Gated-SwinRMT: Unifying Swin Windowed Attention with Retentive Manhattan Decay via
Input-Dependent Gating" (arXiv 2604.06014), Retention variant, on the decomposed Manhattan
self-attention of RMT ("RMT: Retentive Networks Meet Vision Transformers", Fan et al.,
arXiv 2309.11523). Inputs are channels-last grids [batch, height, width, dim].
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def head_log_decay(num_heads: int, initial_value: float = 2.0, heads_range: float = 4.0) -> Tensor:
    """log gamma per head, gamma_h = 1 - 2^(-initial_value - heads_range * h / num_heads)
    (RMT's ``RetNetRelPos2d``): head 0 decays fastest (gamma 0.75), the last slowest."""
    h = torch.arange(num_heads, dtype=torch.float32)
    return torch.log(1 - 2 ** (-initial_value - heads_range * h / num_heads))


def axis_bias(size: int, log_gamma: Tensor) -> Tensor:
    """Additive log-space decay [heads, size, size]: |i - j| * log gamma_h along one axis."""
    pos = torch.arange(size, dtype=log_gamma.dtype, device=log_gamma.device)
    return (pos[:, None] - pos[None, :]).abs() * log_gamma.view(-1, 1, 1)


def shift_regions(height: int, width: int, window: int, shift: int) -> Tensor:
    """Swin's region labels [height, width] of a grid rolled by -shift: tokens of different
    labels share a window only through the roll's wrap-around and must not attend."""
    labels = torch.zeros(height, width, dtype=torch.int64)
    if shift == 0:
        return labels
    cuts = (slice(0, -window), slice(-window, -shift), slice(-shift, None))
    for i, hs in enumerate(cuts):
        for j, ws in enumerate(cuts):
            labels[hs, ws] = 3 * i + j
    return labels


class GatedRetention(nn.Module):
    """Windowed Manhattan-decay retention with Gated-SwinRMT's two gates.

    Per window of ``window_size`` x ``window_size`` tokens, RMT's decomposed retention runs
    a width-wise pass and then a height-wise pass, each a softmax over one axis with an
    additive log-space decay (Gated-SwinRMT-Retention's form)::

        A_w = softmax(q k^T / sqrt(d_h) + |x_n - x_m| log gamma_h)     within each row
        A_h = softmax(q k^T / sqrt(d_h) + |y_n - y_m| log gamma_h)     within each column
        R   = A_h (A_w V)

    so a token reaches another through weights that decay as gamma^(|dx| + |dy|), the
    Manhattan distance. ``shift`` > 0 rolls the grid first, with Swin's mask against
    wrap-around (use window_size // 2 on every other layer). Local context enhancement
    LCE(V) (a depthwise ``lce_kernel`` conv of V, RMT's; 0 turns it off) is added, then::

        out = W_O(G1 ⊙ (R + LCE(V))),  G1 = sigmoid(X W_g)        (output_gate)
        V = (X W_v) ⊙ SiLU(X W_u)                                  (value_gate, SwiGLU)

    The G1 gate is the paper's: from the block input, after LCE and before W_O; it is
    elementwise (one gate per channel, Qwen's G1). The SwiGLU value gate is the paper's
    SWAT-variant idea, whose exact form the notes could not confirm; this SwiGLU form is our
    reading. With both gates off this is the ungated baseline. Departures: the decay rates
    gamma_h are RMT's fixed per-head schedule (:func:`head_log_decay`), not learned; Swin's
    adaptive window collapse and balanced ALiBi slopes are not implemented.

    Parameters (``bias`` on every projection): 4 dim^2 + 4 dim (q, k, v, out), + dim^2 + dim
    per gate, + lce_kernel^2 dim + dim for LCE.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        window_size: int,
        shift: int = 0,
        output_gate: bool = True,
        value_gate: bool = True,
        lce_kernel: int = 3,
        bias: bool = True,
    ):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(
                f"dim={dim} must be a multiple of num_heads={num_heads}; pick num_heads "
                f"dividing dim"
            )
        if window_size < 1 or not 0 <= shift < window_size:
            raise ValueError(
                f"need window_size >= 1 and 0 <= shift < window_size, got window_size="
                f"{window_size}, shift={shift}"
            )
        if lce_kernel < 0 or (lce_kernel and lce_kernel % 2 == 0):
            raise ValueError(f"lce_kernel must be 0 (off) or odd, got {lce_kernel}")
        self.dim, self.num_heads, self.head_dim = dim, num_heads, dim // num_heads
        self.window_size, self.shift = window_size, shift
        self.qk = nn.Linear(dim, 2 * dim, bias=bias)
        self.v = nn.Linear(dim, dim, bias=bias)
        self.v_gate = nn.Linear(dim, dim, bias=bias) if value_gate else None
        self.gate = nn.Linear(dim, dim, bias=bias) if output_gate else None
        self.lce = (
            nn.Conv2d(dim, dim, lce_kernel, padding=lce_kernel // 2, groups=dim)
            if lce_kernel
            else None
        )
        self.out = nn.Linear(dim, dim, bias=bias)
        self.register_buffer("log_gamma", head_log_decay(num_heads), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        b, height, width, _ = x.shape
        q, k = self.qk(x).chunk(2, dim=-1)
        v = self.v(x)
        if self.v_gate is not None:
            v = v * F.silu(self.v_gate(x))
        r = self._retention(q, k, v)
        if self.lce is not None:
            r = r + self.lce(v.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if self.gate is not None:
            r = torch.sigmoid(self.gate(x)) * r
        return self.out(r)

    def _check(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[-1] != self.dim:
            raise ValueError(
                f"GatedRetention expects [batch, height, width, dim={self.dim}], got "
                f"{tuple(x.shape)}"
            )
        w = self.window_size
        if x.shape[1] % w or x.shape[2] % w:
            raise ValueError(
                f"window_size={w} must divide the grid {x.shape[1]}x{x.shape[2]}; pick a "
                "window_size that divides both, or pad the input"
            )

    def _retention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Decomposed windowed retention of q, k, v [B, H, W, dim] -> [B, H, W, dim]."""
        b, height, width, dim = q.shape
        s, w = self.shift, self.window_size
        if s:
            q, k, v = (torch.roll(t, (-s, -s), dims=(1, 2)) for t in (q, k, v))
        q, k, v = (self._windows(t, self.num_heads) for t in (q, k, v))  # [N, heads, w, w, d_h]
        labels = shift_regions(height, width, w, s).to(q.device)[None, ..., None]
        regions = self._windows(labels, 1)[:, 0, ..., 0]  # [nW, w, w]: labels per window
        q = q * (1.0 / math.sqrt(self.head_dim))
        nw = regions.shape[0]
        # width pass: rows are independent; the last axis of a window is x
        row = self._pass(q, k, v, regions, nw)
        # height pass: transpose so the columns' y axis is the attended one
        col = self._pass(
            q.transpose(2, 3), k.transpose(2, 3), row.transpose(2, 3), regions.transpose(1, 2), nw
        ).transpose(2, 3)
        out = self._merge(col, b, height, width)
        return torch.roll(out, (s, s), dims=(1, 2)) if s else out

    def _pass(self, q: Tensor, k: Tensor, v: Tensor, regions: Tensor, nw: int) -> Tensor:
        """One axis of retention: within each row of each window, over its last axis."""
        w = self.window_size
        scores = q @ k.transpose(-1, -2)  # [N, heads, w(rows), w, w]
        scores = scores + axis_bias(w, self.log_gamma.to(q.dtype)).unsqueeze(1)
        if self.shift:
            mask = regions[:, :, :, None] != regions[:, :, None, :]  # [nW, rows, w, w]
            n = scores.shape[0]
            mask = mask.repeat(n // nw, 1, 1, 1).unsqueeze(1)
            scores = scores.masked_fill(mask, float("-inf"))
        return torch.softmax(scores, dim=-1) @ v

    def _windows(self, t: Tensor, heads: int) -> Tensor:
        """[B, H, W, C] -> [B * nWh * nWw, heads, w, w, C / heads] (windows batch-major)."""
        b, height, width, c = t.shape
        w = self.window_size
        t = t.reshape(b, height // w, w, width // w, w, heads, c // heads)
        return t.permute(0, 1, 3, 5, 2, 4, 6).reshape(-1, heads, w, w, c // heads)

    def _merge(self, t: Tensor, b: int, height: int, width: int) -> Tensor:
        w = self.window_size
        t = t.reshape(b, height // w, width // w, self.num_heads, w, w, self.head_dim)
        return t.permute(0, 1, 4, 2, 5, 3, 6).reshape(b, height, width, self.dim)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, window_size={self.window_size}, "
            f"shift={self.shift}, output_gate={self.gate is not None}, "
            f"value_gate={self.v_gate is not None}"
        )


__all__ = ["GatedRetention", "axis_bias", "head_log_decay", "shift_regions"]
