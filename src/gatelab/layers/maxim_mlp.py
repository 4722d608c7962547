"""MAXIM's gated MLP blocks on channels-last images [B, H, W, dim] (the reference is NHWC).

"MAXIM: Multi-Axis MLP for Image Processing" (Tu et al., arXiv 2201.02973):
:class:`MaximGmlpLayer` (block or grid branch), :class:`MultiAxisGatedMLPBlock`,
:class:`SpatialGatingWeights` and :class:`CrossGatingBlock`. H and W must be multiples of
the block size and of the grid size; :func:`block_images` / :func:`unblock_images` do the
blocking. Same vocabulary as :mod:`gatelab.layers.token_mixing` (``dim``, ``hidden_dim``,
``act``, ``bias``, ``dropout``), whose :class:`~gatelab.layers.token_mixing.TokenLinear`
mixes the tokens of a block or grid cell.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..experts import activation
from ._checks import check_dropout, check_positive
from .token_mixing import MAXIM_NAMES, SpatialGatingUnit, TokenLinear, _check_float

__all__ = list(MAXIM_NAMES)


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
