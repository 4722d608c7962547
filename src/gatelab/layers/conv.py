"""Gated convolutions of Zoology: causal short and long (FFT) convolutions, and BaseConv.

"Zoology: Measuring and Improving Recall in Efficient Language Models" (Arora et al.,
arXiv 2312.04927), after ``zoology/mixers/base_conv.py`` and ``convolution.py``. Inputs are
[batch, seq, dim]; every module here is causal: output t reads inputs 0..t only.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def causal_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """Direct depthwise causal convolution: y[b, t, d] = sum_{j <= t} k[d, j] u[b, t - j, d].

    u [B, L, D], kernel [D, K] (any K; taps past L are unused). The reference that
    :func:`fft_causal_conv` is tested against, and the short convolution's arithmetic.
    """
    seq, taps = u.shape[1], min(kernel.shape[1], u.shape[1])
    if seq == 0:  # an empty sequence is a normal case: nothing to convolve
        return u.clone()
    x = F.pad(u.transpose(1, 2), (taps - 1, 0))  # left padding only: no future input
    # conv1d correlates, so flip the kernel to convolve
    w = kernel[:, :taps].flip(-1).unsqueeze(1).to(u.dtype)
    return F.conv1d(x, w, groups=u.shape[2])[..., :seq].transpose(1, 2)


def fft_causal_conv(u: Tensor, kernel: Tensor) -> Tensor:
    """The same convolution as :func:`causal_conv`, by FFT in O(L log L).

    Zero-padding both signals to 2L makes the circular convolution linear, so output t sums
    only inputs 0..t (Zoology's ``fft_conv``, which also adds the skip term ``+ u``; here
    the caller adds it). Computed in float32 at least.
    """
    seq = u.shape[1]
    if seq == 0:
        return u.clone()
    n = 2 * seq
    dtype = torch.promote_types(u.dtype, torch.float32)
    k = kernel[:, :seq].to(dtype)
    u_f = torch.fft.rfft(u.transpose(1, 2).to(dtype), n=n)
    k_f = torch.fft.rfft(k, n=n)
    y = torch.fft.irfft(u_f * k_f, n=n)[..., :seq]
    return y.transpose(1, 2).to(u.dtype)


class ShortConv(nn.Module):
    """Depthwise causal convolution with ``kernel_size`` taps and a bias per channel
    (Zoology's ``ShortConvolution``: ``nn.Conv1d(groups=d, padding=k - 1)`` cut to L).
    Parameters: dim * kernel_size + dim."""

    def __init__(self, dim: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1:
            raise ValueError(f"kernel_size must be >= 1, got {kernel_size}")
        self.dim, self.kernel_size = dim, kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))  # weight[:, j]: lag j
        self.bias = nn.Parameter(torch.empty(dim))
        bound = 1.0 / math.sqrt(kernel_size)  # nn.Conv1d's default bound for fan_in = k
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, u: Tensor) -> Tensor:
        return causal_conv(u, self.weight) + self.bias.to(u.dtype)


class LongConv(nn.Module):
    """Depthwise causal convolution with an explicit filter as long as the sequence, by
    FFT, plus the identity skip: y = k * u + u (Zoology's ``LongConvolution`` with its
    ``fft_conv``). Parameters: dim * max_seq_len.

    Departures: the filter starts at N(0, 1 / max_seq_len) so the output scale does not
    grow with the length (Zoology draws N(0, 1)); Figure 2's default is the implicit filter
    (an MLP over positional features), this is the explicit one the same code offers.
    """

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        if max_seq_len < 1:
            raise ValueError(f"max_seq_len must be >= 1, got {max_seq_len}")
        self.dim, self.max_seq_len = dim, max_seq_len
        self.filter = nn.Parameter(torch.randn(dim, max_seq_len) / math.sqrt(max_seq_len))

    def forward(self, u: Tensor) -> Tensor:
        if u.shape[1] > self.max_seq_len:
            raise ValueError(
                f"sequence length {u.shape[1]} exceeds max_seq_len={self.max_seq_len}; "
                "build LongConv with a larger max_seq_len"
            )
        return fft_causal_conv(u, self.filter) + u


class BaseConv(nn.Module):
    """Zoology's BaseConv: a convolution gated by a linear projection, plus a residual::

        y = Conv(u) * Linear_{dim -> dim}(u) + u         (act: SiLU on both branches)

    ``kernel_size`` > 0 gives a :class:`ShortConv` of that many taps; -1 gives a
    :class:`LongConv` over ``max_seq_len`` positions (Zoology's convention; its Figure 2
    model alternates a short (k = 3) and a long layer). Parameters: dim * dim + dim (the
    projection) plus the convolution's.
    """

    def __init__(
        self,
        dim: int,
        max_seq_len: int | None = None,
        kernel_size: int = 3,
        act: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        if kernel_size == -1:
            if max_seq_len is None:
                raise ValueError("kernel_size=-1 (long convolution) needs max_seq_len")
            self.conv: nn.Module = LongConv(dim, max_seq_len)
        elif kernel_size >= 1:
            self.conv = ShortConv(dim, kernel_size)
        else:
            raise ValueError(f"kernel_size must be >= 1 or -1 (long), got {kernel_size}")
        self.dim, self.kernel_size, self.act = dim, kernel_size, act
        self.projection = nn.Linear(dim, dim, bias=bias)

    def forward(self, u: Tensor) -> Tensor:
        if u.dim() != 3 or u.shape[-1] != self.dim:
            raise ValueError(f"BaseConv expects [batch, seq, dim={self.dim}], got {tuple(u.shape)}")
        conv, proj = self.conv(u), self.projection(u)
        if self.act:
            conv, proj = F.silu(conv), F.silu(proj)
        return conv * proj + u


__all__ = ["BaseConv", "LongConv", "ShortConv", "causal_conv", "fft_causal_conv"]
