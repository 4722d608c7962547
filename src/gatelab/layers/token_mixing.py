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
- MAXIM's blocks take channels-last images [B, H, W, dim] (the reference code is NHWC):
  :class:`MaximGmlpLayer` (block or grid branch), :class:`MultiAxisGatedMLPBlock`,
  :class:`SpatialGatingWeights` and :class:`CrossGatingBlock`. H and W must be multiples
  of the block size and of the grid size; :func:`block_images` / :func:`unblock_images`
  do the blocking.

Every class names its paper and where it departs from the reference code.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..experts import activation
from ._checks import check_dropout, check_positive
from .mlp import Mlp

__all__ = [
    "ActivatorBlock",
    "ActivatorGatingUnit",
    "CrossGatingBlock",
    "GMLPBlock",
    "MaximGmlpLayer",
    "MixerBlock",
    "MixerGatingUnit",
    "MultiAxisGatedMLPBlock",
    "NiNformerBlock",
    "RaftLevel",
    "SpatialGatingUnit",
    "SpatialGatingWeights",
    "block_images",
    "unblock_images",
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


def _pair(value: int | tuple[int, int] | list[int], name: str, who: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"{who}: {name} must be a positive int or (height, width), got {value!r}")
    return pair  # type: ignore[return-value]


def _check_image(x: Tensor, dim: int, multiple: tuple[int, int], who: str) -> None:
    """x must be channels-last [B, H, W, dim] with H, W multiples of ``multiple``."""
    _check_float(x, who)
    if x.dim() != 4 or x.shape[-1] != dim:
        raise ValueError(
            f"{who} expects channels-last images [batch, height, width, {dim}], got "
            f"{tuple(x.shape)}; permute NCHW input with x.permute(0, 2, 3, 1)"
        )
    h, w = x.shape[1:3]
    mh, mw = multiple
    if h % mh or w % mw:
        raise ValueError(
            f"{who}: height x width {h}x{w} must be multiples of {mh}x{mw} (the block and grid "
            "sizes); pad or crop the input, or choose block_size and grid_size that divide it"
        )


def _lcm2(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int]:
    return math.lcm(a[0], b[0]), math.lcm(a[1], b[1])


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


# -- MAXIM --------------------------------------------------------------------------------


def block_images(x: Tensor, patch: tuple[int, int]) -> Tensor:
    """[B, H, W, C] -> [B, gh * gw, fh * fw, C] with (fh, fw) = patch, gh = H / fh.

    Axis 1 indexes the grid cells (row-major), axis 2 the pixels inside a cell (row-major),
    as MAXIM's ``block_images_einops``.
    """
    b, h, w, c = x.shape
    fh, fw = patch
    if h % fh or w % fw:
        raise ValueError(f"block_images: {h}x{w} is not a multiple of the patch {fh}x{fw}")
    gh, gw = h // fh, w // fw
    x = x.reshape(b, gh, fh, gw, fw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, fh * fw, c)


def unblock_images(x: Tensor, grid: tuple[int, int], patch: tuple[int, int]) -> Tensor:
    """The inverse of :func:`block_images`: [B, gh * gw, fh * fw, C] -> [B, H, W, C]."""
    b, _, _, c = x.shape
    (gh, gw), (fh, fw) = grid, patch
    x = x.reshape(b, gh, gw, fh, fw, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * fh, gw * fw, c)


def _blocked(x: Tensor, size: tuple[int, int], mode: str) -> tuple[Tensor, tuple, tuple, int]:
    """Block x [B, H, W, C] for a ``mode`` branch: (blocked, grid, patch, token axis)."""
    h, w = x.shape[1:3]
    if mode == "block":  # fixed patch; mix the fh*fw pixels inside each block (local)
        patch = size
        grid = (h // patch[0], w // patch[1])
        axis = -2
    else:  # fixed grid; mix the gh*gw cells, one pixel each, a dilated (global) mixing
        grid = size
        patch = (h // grid[0], w // grid[1])
        axis = -3
    return block_images(x, patch), grid, patch, axis


class MaximGmlpLayer(nn.Module):
    """MAXIM's block (local) or grid (global) gMLP layer on [B, H, W, dim].

    "MAXIM: Multi-Axis MLP for Image Processing" (Tu et al.; arXiv 2201.02973), following
    ``google-research/maxim`` (``BlockGmlpLayer`` / ``GridGmlpLayer``): x + Dropout(
    Dense_dim(SGU(GELU(Dense_{factor*dim}(LN(x)))))), where the gating unit mixes, with
    ``mode="block"``, the size[0]*size[1] pixels inside each block of that fixed size, and
    with ``mode="grid"``, the size[0]*size[1] cells of a fixed grid (pixels H/size[0] apart).
    H and W must be multiples of ``size``. The SGU is :class:`SpatialGatingUnit` (MAXIM's
    "+1" folded into the token bias). ``hidden_dim`` = factor * dim (2 in MAXIM) must be
    even.
    """

    def __init__(
        self,
        dim: int,
        size: int | tuple[int, int],
        mode: str = "block",
        *,
        hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        hidden_dim = 2 * dim if hidden_dim is None else hidden_dim
        check_positive("MaximGmlpLayer", dim=dim, hidden_dim=hidden_dim)
        check_dropout("MaximGmlpLayer", dropout)
        if mode not in ("block", "grid"):
            raise ValueError(f"MaximGmlpLayer: mode must be 'block' or 'grid', got {mode!r}")
        if hidden_dim % 2:
            raise ValueError(f"MaximGmlpLayer: hidden_dim must be even, got {hidden_dim}")
        self.dim, self.mode = dim, mode
        self.size = _pair(size, f"{mode}_size", "MaximGmlpLayer")
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, hidden_dim, bias=bias)
        self.act_fn = activation(act)
        self.sgu = SpatialGatingUnit(hidden_dim, self.size[0] * self.size[1])
        self.proj_out = nn.Linear(hidden_dim // 2, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, size={self.size}"

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.dim, self.size, f"MaximGmlpLayer({self.mode})")
        blocked, grid, patch, axis = _blocked(x, self.size, self.mode)
        y = self.sgu(self.act_fn(self.proj_in(self.norm(blocked))), axis)
        y = blocked + self.drop(self.proj_out(y))
        return unblock_images(y, grid, patch)


class MultiAxisGatedMLPBlock(nn.Module):
    """MAXIM's multi-axis gated MLP block (MAB) on channels-last images [B, H, W, dim].

    "MAXIM: Multi-Axis MLP for Image Processing" (Tu et al.; arXiv 2201.02973), following
    ``google-research/maxim`` (``ResidualSplitHeadMultiAxisGmlpLayer``):
    u, v = split(GELU(Dense_{2*dim}(LN(x)))); u = grid gMLP(u) (global), v = block gMLP(v)
    (local); out = x + Dropout(Dense_dim([u, v])). The branches work on ``dim`` channels
    each with hidden width ``hidden_dim`` (2 * dim, the code's ``grid/block_gmlp_factor``).
    H and W must be multiples of lcm(block_size, grid_size). Departure: none.
    """

    def __init__(
        self,
        dim: int,
        block_size: int | tuple[int, int] = 8,
        grid_size: int | tuple[int, int] = 8,
        *,
        hidden_dim: int | None = None,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("MultiAxisGatedMLPBlock", dim=dim)
        check_dropout("MultiAxisGatedMLPBlock", dropout)
        self.dim = dim
        self.block_size = _pair(block_size, "block_size", "MultiAxisGatedMLPBlock")
        self.grid_size = _pair(grid_size, "grid_size", "MultiAxisGatedMLPBlock")
        kw = {"hidden_dim": hidden_dim, "act": act, "bias": bias, "dropout": dropout}
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * dim, bias=bias)
        self.act_fn = activation(act)
        self.grid = MaximGmlpLayer(dim, self.grid_size, "grid", **kw)
        self.block = MaximGmlpLayer(dim, self.block_size, "block", **kw)
        self.proj_out = nn.Linear(2 * dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    @property
    def multiple(self) -> tuple[int, int]:
        """The input height and width must be multiples of this."""
        return _lcm2(self.block_size, self.grid_size)

    def forward(self, x: Tensor) -> Tensor:
        _check_image(x, self.dim, self.multiple, "MultiAxisGatedMLPBlock")
        u, v = self.act_fn(self.proj_in(self.norm(x))).chunk(2, dim=-1)
        y = torch.cat([self.grid(u), self.block(v)], dim=-1)
        return x + self.drop(self.proj_out(y))


class SpatialGatingWeights(nn.Module):
    """MAXIM's ``GetSpatialGatingWeights``: the multi-axis gate a cross-gating block applies.

    "MAXIM: Multi-Axis MLP for Image Processing" (Tu et al.; arXiv 2201.02973):
    u, v = split(GELU(Dense_{2*dim}(LN(x)))); u = grid-axis token Linear(u) (global),
    v = block-axis token Linear(v) (local), both with weight N(0, 0.02^2) and bias 1;
    out = Dropout(Dense_dim([u, v])). [B, H, W, dim] -> same.
    """

    def __init__(
        self,
        dim: int,
        block_size: int | tuple[int, int] = 8,
        grid_size: int | tuple[int, int] = 8,
        *,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        check_positive("SpatialGatingWeights", dim=dim)
        check_dropout("SpatialGatingWeights", dropout)
        self.dim = dim
        self.block_size = block_size = _pair(block_size, "block_size", "SpatialGatingWeights")
        self.grid_size = grid_size = _pair(grid_size, "grid_size", "SpatialGatingWeights")
        self.norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(dim, 2 * dim, bias=bias)
        self.act_fn = activation(act)
        self.grid_proj = TokenLinear(grid_size[0] * grid_size[1])
        self.block_proj = TokenLinear(block_size[0] * block_size[1])
        self.proj_out = nn.Linear(2 * dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    def _mix(self, x: Tensor, proj: TokenLinear, size: tuple[int, int], mode: str) -> Tensor:
        blocked, grid, patch, axis = _blocked(x, size, mode)
        return unblock_images(proj(blocked, axis), grid, patch)

    def forward(self, x: Tensor) -> Tensor:
        multiple = _lcm2(self.block_size, self.grid_size)
        _check_image(x, self.dim, multiple, "SpatialGatingWeights")
        u, v = self.act_fn(self.proj_in(self.norm(x))).chunk(2, dim=-1)
        u = self._mix(u, self.grid_proj, self.grid_size, "grid")
        v = self._mix(v, self.block_proj, self.block_size, "block")
        return self.drop(self.proj_out(torch.cat([u, v], dim=-1)))


class CrossGatingBlock(nn.Module):
    """MAXIM's cross-gating block (CGB): two feature maps gate each other.

    "MAXIM: Multi-Axis MLP for Image Processing" (Tu et al.; arXiv 2201.02973), following
    ``google-research/maxim`` (``CrossGatingBlock``). Inputs channels-last x [B, H, W,
    x_dim] and y [B, H, W, y_dim] (or [B, H/2, W/2, y_dim] with ``upsample_y``, then
    brought up by a 2x2 stride-2 transposed conv to ``dim`` channels):

    1. x, y = Linear_dim(x), Linear_dim(y) (the code's 1x1 convs); keep shortcuts sx, sy.
    2. x = GELU(Dense(LN(x))), y likewise.
    3. gx = :class:`SpatialGatingWeights`(x), gy likewise from y.
    4. y = Dense(y * gx) + sy;  x = Dense(x * gy) + y + sx.

    Returns (x, y), both [B, H, W, dim]. H and W (after upsampling) must be multiples of
    lcm(block_size, grid_size).
    """

    def __init__(
        self,
        dim: int,
        x_dim: int | None = None,
        y_dim: int | None = None,
        *,
        block_size: int | tuple[int, int] = 8,
        grid_size: int | tuple[int, int] = 8,
        upsample_y: bool = False,
        act: str = "gelu",
        bias: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        x_dim = dim if x_dim is None else x_dim
        y_dim = dim if y_dim is None else y_dim
        check_positive("CrossGatingBlock", dim=dim, x_dim=x_dim, y_dim=y_dim)
        check_dropout("CrossGatingBlock", dropout)
        self.dim, self.x_dim, self.y_dim = dim, x_dim, y_dim
        self.block_size = _pair(block_size, "block_size", "CrossGatingBlock")
        self.grid_size = _pair(grid_size, "grid_size", "CrossGatingBlock")
        self.upsample = (
            nn.ConvTranspose2d(y_dim, dim, 2, stride=2, bias=bias) if upsample_y else None
        )
        self.x_in = nn.Linear(x_dim, dim, bias=bias)
        self.y_in = nn.Linear(dim if upsample_y else y_dim, dim, bias=bias)
        kw = {"act": act, "bias": bias, "dropout": dropout}
        self.act_fn = activation(act)
        self.x_norm, self.y_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.x_proj = nn.Linear(dim, dim, bias=bias)
        self.y_proj = nn.Linear(dim, dim, bias=bias)
        self.x_gate = SpatialGatingWeights(dim, self.block_size, self.grid_size, **kw)
        self.y_gate = SpatialGatingWeights(dim, self.block_size, self.grid_size, **kw)
        self.x_out = nn.Linear(dim, dim, bias=bias)
        self.y_out = nn.Linear(dim, dim, bias=bias)
        self.drop = nn.Dropout(dropout)

    @property
    def multiple(self) -> tuple[int, int]:
        """The height and width of x must be multiples of this."""
        return _lcm2(self.block_size, self.grid_size)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        _check_image(x, self.x_dim, self.multiple, "CrossGatingBlock (x)")
        _check_image(y, self.y_dim, (1, 1), "CrossGatingBlock (y)")
        if self.upsample is not None:
            y = self.upsample(y.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        if y.shape[:3] != x.shape[:3]:
            up = " after the 2x upsampling" if self.upsample is not None else ""
            raise ValueError(
                f"CrossGatingBlock: y{up} must have x's batch and spatial size "
                f"{tuple(x.shape[:3])}, got {tuple(y.shape[:3])}"
            )
        x = sx = self.x_in(x)
        y = sy = self.y_in(y)
        x = self.act_fn(self.x_proj(self.x_norm(x)))
        y = self.act_fn(self.y_proj(self.y_norm(y)))
        gx, gy = self.x_gate(x), self.y_gate(y)
        y = self.drop(self.y_out(y * gx)) + sy
        x = self.drop(self.x_out(x * gy)) + y + sx
        return x, y
