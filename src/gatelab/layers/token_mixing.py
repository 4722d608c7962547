"""Token-mixing blocks: gMLP, MLP-Mixer, RaftMLP, NiNformer, Activator and MAXIM's gated MLPs.

One vocabulary: ``dim`` (channels of the residual stream), ``hidden_dim`` (the width inside
a block's MLPs), ``act`` (a gatelab activation name: "gelu", "silu", "relu", "gelu_tanh"),
``bias`` (biases of the channel projections), ``dropout``. Blocks whose token-mixing
weights depend on the number of tokens take it (``num_tokens``, or the grid ``height`` x
``width`` for RaftMLP) and check it on every call.

- Sequence blocks take tokens [B, N, dim] and return [B, N, dim]:
  :class:`GMLPBlock` (with :class:`SpatialGatingUnit`), :class:`MixerBlock`,
  :class:`RaftLevel`, :class:`NiNformerBlock` (with :class:`MixerGatingUnit`),
  :class:`ActivatorBlock` (with :class:`ActivatorGatingUnit`).
- MAXIM's blocks on channels-last images [B, H, W, dim] live in
  :mod:`gatelab.layers.maxim_mlp` (the old import path here still works, with a warning).

Every class names its paper and where it departs from the reference code.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..experts import activation
from ..legacy import moved
from ._checks import check_dropout, check_positive
from .mlp import Mlp

__all__ = [
    "ActivatorBlock",
    "ActivatorGatingUnit",
    "GMLPBlock",
    "MixerBlock",
    "MixerGatingUnit",
    "NiNformerBlock",
    "RaftLevel",
    "SpatialGatingUnit",
    "TokenLinear",
]


# -- validation ---------------------------------------------------------------------------


def _check_float(x: object, who: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{who} expects a float tensor, got {kind}")


def _check_tokens(x: Tensor, dim: int, num_tokens: int | None, who: str) -> None:
    """x must be [B, N, dim], with N = num_tokens when the block's weights fix it."""
    _check_float(x, who)
    n = "N" if num_tokens is None else str(num_tokens)
    if x.dim() != 3 or x.shape[-1] != dim or (num_tokens is not None and x.shape[1] != num_tokens):
        raise ValueError(
            f"{who} expects tokens [batch, {n}, {dim}], got {tuple(x.shape)}; build the block "
            "with dim (and num_tokens) matching the input"
        )


# -- shared pieces ------------------------------------------------------------------------


class TokenLinear(nn.Module):
    """A Linear over the token axis ``axis`` of a tensor whose last axis is channels.

    weight [num_tokens, num_tokens] initialised N(0, init_std^2) and bias [num_tokens]
    initialised to ``bias_init``: the spatial projection of gMLP's gating unit and of
    MAXIM's block and grid gating. It is always biased: with the bias at 1 and the weight
    near zero, the gate it feeds starts as the identity, which gMLP reports is what makes
    training stable.
    """

    def __init__(self, num_tokens: int, *, init_std: float = 0.02, bias_init: float = 1.0):
        super().__init__()
        check_positive("TokenLinear", num_tokens=num_tokens)
        self.num_tokens = num_tokens
        self.weight = nn.Parameter(torch.empty(num_tokens, num_tokens).normal_(0.0, init_std))
        self.bias = nn.Parameter(torch.full((num_tokens,), float(bias_init)))

    def extra_repr(self) -> str:
        return f"num_tokens={self.num_tokens}"

    def forward(self, x: Tensor, axis: int = -2) -> Tensor:
        if x.shape[axis] != self.num_tokens:
            raise ValueError(
                f"TokenLinear mixes {self.num_tokens} tokens along axis {axis}, got "
                f"{x.shape[axis]} (input {tuple(x.shape)})"
            )
        y = x.transpose(axis, -1)
        y = nn.functional.linear(y, self.weight, self.bias)
        return y.transpose(axis, -1)


# -- gMLP ---------------------------------------------------------------------------------


class SpatialGatingUnit(nn.Module):
    """gMLP's spatial gating unit: s(Z) = Z1 * (W LN(Z2) + b), Z = [Z1, Z2] split by channel.

    "Pay Attention to MLPs" (Liu, Dai, So, Le; arXiv 2105.08050), section 2.1. Input
    [..., N, dim] (``dim`` even), output [..., N, dim // 2]; W [N, N] mixes tokens along
    ``axis`` (default -2), shared across channels. W starts near zero (N(0, init_std^2))
    and b at 1, so the unit starts as Z1 * 1, as the paper prescribes.

    MAXIM's block and grid gating units (``u * (Dense(LN(v)) + 1)`` with the Dense bias at
    0, weight N(0, 0.02^2)) are this unit with the constant 1 folded into the bias: the same
    function at initialisation and the same gradients; :class:`MaximGmlpLayer` uses it
    with ``axis`` -2 (block) or -3 (grid). Departure: the spatial projection is always
    biased (see :class:`TokenLinear`); no causal mask (the blocks here are for images).
    """

    def __init__(self, dim: int, num_tokens: int, *, init_std: float = 0.02, eps: float = 1e-5):
        super().__init__()
        check_positive("SpatialGatingUnit", dim=dim, num_tokens=num_tokens)
        if dim % 2:
            raise ValueError(
                f"SpatialGatingUnit splits its input in two halves: dim must be even, got {dim}"
            )
        self.dim, self.num_tokens = dim, num_tokens
        self.norm = nn.LayerNorm(dim // 2, eps=eps)
        self.proj = TokenLinear(num_tokens, init_std=init_std, bias_init=1.0)

    def forward(self, x: Tensor, axis: int = -2) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"SpatialGatingUnit expects {self.dim} channels in the last axis, got "
                f"{tuple(x.shape)}"
            )
        u, v = x.chunk(2, dim=-1)
        return u * self.proj(self.norm(v), axis)


class GMLPBlock(nn.Module):
    """gMLP block: x + Dropout(W_out SGU(act(W_in LN(x)))).

    "Pay Attention to MLPs" (Liu, Dai, So, Le; arXiv 2105.08050), Figure 1. Tokens
    [B, num_tokens, dim] -> same. W_in: dim -> hidden_dim (even), the SGU halves it, W_out:
    hidden_dim / 2 -> dim. The paper's act is GELU. Departures: none in the block; the
    token-mixing weight is initialised N(0, 0.02^2) ("near zero" in the paper) and the
    attention-augmented aMLP variant is not built.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_tokens: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("GMLPBlock", dim=dim, hidden_dim=hidden_dim, num_tokens=num_tokens)
        check_dropout("GMLPBlock", dropout)
        if hidden_dim % 2:
            raise ValueError(
                f"GMLPBlock: hidden_dim must be even (the gating unit splits it), got {hidden_dim}"
            )
        self.dim, self.num_tokens = dim, num_tokens
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.act_fn = activation(act)
        self.sgu = SpatialGatingUnit(hidden_dim, num_tokens)
        self.proj_out = nn.Linear(hidden_dim // 2, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, self.num_tokens, "GMLPBlock")
        y = self.sgu(self.act_fn(self.proj_in(self.norm(x))))
        return x + self.drop(self.proj_out(y))


# -- MLP-Mixer ----------------------------------------------------------------------------


class MixerBlock(nn.Module):
    """MLP-Mixer block: token mixing then channel mixing, each a pre-LN residual MLP.

    "MLP-Mixer: An all-MLP Architecture for Vision" (Tolstikhin et al.; arXiv 2105.01601),
    eq. (1): U = X + W2 act(W1 LN(X)^T)^T over tokens (num_tokens -> token_hidden_dim ->
    num_tokens, shared across channels), Y = U + W4 act(W3 LN(U)) over channels (dim ->
    hidden_dim -> dim). ``token_hidden_dim`` defaults to ``hidden_dim`` (as NiNformer's
    code does; the paper's D_S is usually smaller than D_C). Dropout after each Linear
    (the paper uses none; NiNformer's code does). Tokens [B, num_tokens, dim] -> same.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_tokens: int,
        *,
        token_hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        token_hidden_dim = hidden_dim if token_hidden_dim is None else token_hidden_dim
        check_positive(
            "MixerBlock",
            dim=dim,
            hidden_dim=hidden_dim,
            num_tokens=num_tokens,
            token_hidden_dim=token_hidden_dim,
        )
        self.dim, self.num_tokens = dim, num_tokens
        self.token_norm = nn.LayerNorm(dim)
        self.token_mlp = Mlp(num_tokens, token_hidden_dim, act=act, bias=bias, dropout=dropout)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, hidden_dim, act=act, bias=bias, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, self.num_tokens, "MixerBlock")
        x = x + self.token_mlp(self.token_norm(x).transpose(1, 2)).transpose(1, 2)
        return x + self.channel_mlp(self.channel_norm(x))


# -- RaftMLP ------------------------------------------------------------------------------


class RaftLevel(nn.Module):
    """One RaftMLP block: vertical-channel, horizontal-channel, then channel mixing.

    "RaftMLP: How Much Can Be Done Without Attention and with Less Spatial Locality?"
    (Tatsunami, Taki; arXiv 2108.04384, id recalled, not in the shared notes),
    following ``okojoalg/raft-mlp``
    (``SerialPermutedLevel``). Tokens [B, height * width, dim] in row-major order, dim =
    raft_size * c'. The channels split as (r c'), r outer, as the reference's rearrange
    ``b (h w) (r c') -> b (c' w) (r h)`` does. The vertical mixer is
    x + MLP_{r*h -> e*r*h -> r*h}(LN(x)) over each column's r*h values (one raft of r
    channels jointly with the h rows), shared over columns and the c' raft groups; the
    horizontal one is the same over r*w; then x + MLP_{dim -> hidden_dim -> dim}(LN(x)).
    LayerNorms are over all ``dim`` channels, as in the reference. ``token_expansion`` e
    is 2 and ``hidden_dim`` is 4 * dim in the paper.

    Departures: no drop-path (``dropout`` after each Linear instead); off-size inputs are an
    error rather than bicubically resized to the trained grid.
    """

    def __init__(
        self,
        dim: int,
        height: int,
        width: int,
        *,
        raft_size: int = 2,
        hidden_dim: int | None = None,
        token_expansion: int = 2,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden_dim = 4 * dim if hidden_dim is None else hidden_dim
        check_positive(
            "RaftLevel",
            dim=dim,
            height=height,
            width=width,
            raft_size=raft_size,
            hidden_dim=hidden_dim,
            token_expansion=token_expansion,
        )
        if dim % raft_size:
            raise ValueError(
                f"RaftLevel: dim={dim} must be divisible by raft_size={raft_size} (the channels "
                "are cut into rafts of raft_size); change dim or raft_size"
            )
        self.dim, self.height, self.width, self.raft_size = dim, height, width, raft_size
        r = raft_size
        kw = {"act": act, "bias": bias, "dropout": dropout}
        self.vertical_norm = nn.LayerNorm(dim)
        self.vertical_mlp = Mlp(r * height, token_expansion * r * height, **kw)
        self.horizontal_norm = nn.LayerNorm(dim)
        self.horizontal_mlp = Mlp(r * width, token_expansion * r * width, **kw)
        self.channel_norm = nn.LayerNorm(dim)
        self.channel_mlp = Mlp(dim, hidden_dim, **kw)

    def extra_repr(self) -> str:
        return f"grid={self.height}x{self.width}, raft_size={self.raft_size}"

    def _mix(self, x: Tensor, norm: nn.LayerNorm, mlp: Mlp, vertical: bool) -> Tensor:
        b, h, w, r = x.shape[0], self.height, self.width, self.raft_size
        y = norm(x).view(b, h, w, r, self.dim // r)  # (h w) (r c')
        # vertical: (c' w) (r h); horizontal: (c' h) (r w)
        perm = (0, 4, 2, 3, 1) if vertical else (0, 4, 1, 3, 2)
        y = y.permute(perm)
        shape = y.shape
        y = mlp(y.reshape(*shape[:3], shape[3] * shape[4])).view(shape)
        inverse = (0, 4, 2, 3, 1) if vertical else (0, 2, 4, 3, 1)
        return x + y.permute(inverse).reshape(x.shape)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, self.height * self.width, "RaftLevel")
        x = self._mix(x, self.vertical_norm, self.vertical_mlp, vertical=True)
        x = self._mix(x, self.horizontal_norm, self.horizontal_mlp, vertical=False)
        return x + self.channel_mlp(self.channel_norm(x))


# -- NiNformer ----------------------------------------------------------------------------


class MixerGatingUnit(nn.Module):
    """NiNformer's MLP-Mixer gating unit: MGU(z) = Linear_{dim -> dim}(z) * Mixer(z).

    "NiNformer: A Network in Network Transformer with Token Mixing Generated Gating
    Function" (Abdullah, Aydin; arXiv 2403.02411, id recalled, not in the shared notes),
    following ``Abdullah-88/NiNformer``
    (``MixerGatingUnit``): a whole :class:`MixerBlock` produces an input-dependent,
    elementwise gate on a linear projection of the same tokens.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_tokens: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=bias)
        self.mixer = MixerBlock(dim, hidden_dim, num_tokens, act=act, bias=bias, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.mixer(x)


class NiNformerBlock(nn.Module):
    """NiNformer block: x1 = x + MGU(LN(x)); out = x1 + FFN(LN(x1)).

    "NiNformer: A Network in Network Transformer with Token Mixing Generated Gating
    Function" (Abdullah, Aydin; arXiv 2403.02411, id recalled, not in the shared notes),
    following ``Abdullah-88/NiNformer``
    (``NiNBlock``): the attention sublayer of a transformer block is replaced by
    :class:`MixerGatingUnit`. As in the reference code one LayerNorm module (one set of
    affine parameters) serves both sublayers. FFN: dim -> hidden_dim -> dim, with dropout;
    the inner Mixer uses hidden_dim for both its token and channel MLPs (d_ffn in the
    code). Tokens [B, num_tokens, dim] -> same.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        num_tokens: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("NiNformerBlock", dim=dim, hidden_dim=hidden_dim, num_tokens=num_tokens)
        check_dropout("NiNformerBlock", dropout)
        self.dim, self.num_tokens = dim, num_tokens
        self.norm = nn.LayerNorm(dim)
        self.gate = MixerGatingUnit(
            dim, hidden_dim, num_tokens, act=act, bias=bias, dropout=dropout
        )
        self.ffn = Mlp(dim, hidden_dim, act=act, bias=bias, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, self.num_tokens, "NiNformerBlock")
        x = x + self.gate(self.norm(x))
        return x + self.ffn(self.norm(x))


# -- Activator ----------------------------------------------------------------------------


class ActivatorGatingUnit(nn.Module):
    """Activator's gating unit: W3 (LN_h(act(W1 z)) * LN_h(W2 z)), per token.

    "Activator: GLU Activations as The Core Functions of a Vision Transformer"
    (Abdullah, Aydin; arXiv 2405.15953, id recalled, not in the shared notes),
    following ``Abdullah-88/Activator``
    (``ActivatorGatingUnit``): W1, W2: dim -> hidden_dim, W3: hidden_dim -> dim, and one
    LayerNorm module over hidden_dim normalises both branches (as in the code). Nothing
    here mixes tokens: like the reference, the unit works on any number of tokens
    [..., dim].
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("ActivatorGatingUnit", dim=dim, hidden_dim=hidden_dim)
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.value_proj = nn.Linear(dim, hidden_dim, bias=bias)
        self.norm = nn.LayerNorm(hidden_dim)
        self.act_fn = activation(act)
        self.out_proj = nn.Linear(hidden_dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        u = self.norm(self.act_fn(self.gate_proj(x)))
        v = self.norm(self.value_proj(x))
        return self.drop(self.out_proj(u * v))


class ActivatorBlock(nn.Module):
    """Activator block: x1 = x + AGU(LN(x)); out = x1 + FFN(LN(x1)) (or x1 with ``ffn=False``).

    "Activator: GLU Activations as The Core Functions of a Vision Transformer"
    (Abdullah, Aydin; arXiv 2405.15953, id recalled, not in the shared notes),
    following ``Abdullah-88/Activator``
    (``ActivatorBlock``; ``ffn=False`` is ``activator_only_GEGLU.py``). The attention
    sublayer is replaced by :class:`ActivatorGatingUnit`; one LayerNorm module serves both
    sublayers, as in the code. Caveat kept from the reference: the block never mixes
    tokens; in a classifier only the patch embedding and the pooling see more than one
    token. Tokens [B, N, dim] -> same, any N.
    """

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        *,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
        ffn: bool = True,
    ):
        super().__init__()
        check_positive("ActivatorBlock", dim=dim, hidden_dim=hidden_dim)
        check_dropout("ActivatorBlock", dropout)
        self.dim = dim
        self.norm = nn.LayerNorm(dim)
        self.gate = ActivatorGatingUnit(dim, hidden_dim, act=act, bias=bias, dropout=dropout)
        self.ffn = Mlp(dim, hidden_dim, act=act, bias=bias, dropout=dropout) if ffn else None

    def forward(self, x: Tensor) -> Tensor:
        _check_tokens(x, self.dim, None, "ActivatorBlock")
        x = x + self.gate(self.norm(x))
        return x if self.ffn is None else x + self.ffn(self.norm(x))


# MAXIM's image blocks moved to gatelab.layers.maxim_mlp (issue 14: one module per family).
MAXIM_NAMES = (
    "CrossGatingBlock",
    "MaximGmlpLayer",
    "MultiAxisGatedMLPBlock",
    "SpatialGatingWeights",
    "block_images",
    "unblock_images",
)
__getattr__ = moved(__name__, dict.fromkeys(MAXIM_NAMES, "gatelab.layers.maxim_mlp"))
