"""A small single-stage MAXIM UNet for image restoration, and a plain convolutional UNet of
the same skeleton as its baseline.

Both map images [B, C, H, W] to restored images of the same shape (the network predicts a
residual added to its input). Neither returns a ``ModelOutput`` (they are not classifiers
or LMs), so they are not in ``MODELS``; their configs are plain-typed dataclasses like the
others'. :class:`MaximUNet` needs H and W to be multiples of
2^depth * lcm(block_size, grid_size); :class:`ConvUNet` multiples of 2^depth.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers.maxim_mlp import CrossGatingBlock, MultiAxisGatedMLPBlock
from ..layers.mlp import Mlp
from .common import num_parameters
from .config import Config, ConfigError, check_positive


def _nhwc(fn, x: Tensor) -> Tensor:
    """Apply a channels-last function to an NCHW tensor."""
    return fn(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _check_images(x: object, channels: int, multiple: int, who: str, why: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        kind = x.dtype if isinstance(x, Tensor) else type(x).__name__
        raise TypeError(f"{who} expects a float tensor of images, got {kind}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(
            f"{who} expects images [batch, {channels}, height, width], got {tuple(x.shape)}; "
            "set in_channels to match the data"
        )
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise ValueError(
            f"{who}: height and width must be multiples of {multiple} ({why}), got {h}x{w}; "
            "crop or pad the input"
        )
    return x


# -- MAXIM's convolutional companions ------------------------------------------------------


class SqueezeExcite(nn.Module):
    """Channel attention: x * sigmoid(W2 relu(W1 mean_hw(x))), W1: C -> C / reduction."""

    def __init__(self, dim: int, reduction: int = 4, bias: bool = True):
        super().__init__()
        hidden = max(1, dim // reduction)
        self.fc1 = nn.Conv2d(dim, hidden, 1, bias=bias)
        self.fc2 = nn.Conv2d(hidden, dim, 1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        s = x.mean(dim=(2, 3), keepdim=True)
        return x * torch.sigmoid(self.fc2(F.relu(self.fc1(s))))


class RCAB(nn.Module):
    """MAXIM's residual channel attention block (NCHW): x + SE(conv3(lrelu(conv3(LN(x)))))."""

    def __init__(self, dim: int, reduction: int = 4, bias: bool = True):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.se = SqueezeExcite(dim, reduction, bias)

    def forward(self, x: Tensor) -> Tensor:
        y = self.conv1(_nhwc(self.norm, x))
        return x + self.se(self.conv2(F.leaky_relu(y, 0.2)))


class RDCAB(nn.Module):
    """MAXIM's bottleneck residual block (NCHW): x + SE(MLP_{C -> C -> C}(LN(x)))."""

    def __init__(self, dim: int, reduction: int = 4, bias: bool = True, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim, bias=bias, dropout=dropout)
        self.se = SqueezeExcite(dim, reduction, bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.se(_nhwc(lambda t: self.mlp(self.norm(t)), x))


# -- MAXIM UNet ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaximUNetConfig(Config):
    """Every setting of :class:`MaximUNet`.

    ``features`` F channels at full resolution (2^i F at level i), ``depth`` encoder
    levels, ``num_groups`` (MAB + RCAB) pairs per level, ``num_bottleneck`` (MAB + RDCAB)
    bottleneck blocks, ``block_size`` / ``grid_size`` of every MAB and CGB (one value
    for every level), ``se_reduction`` of the squeeze-excitation, ``bias``, ``dropout``.
    """

    in_channels: int = 1
    features: int = 16
    depth: int = 2
    num_groups: int = 1
    num_bottleneck: int = 1
    block_size: int = 4
    grid_size: int = 4
    se_reduction: int = 4
    bias: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive(self, "in_channels", "features", "depth", "num_groups")
        check_positive(self, "block_size", "grid_size", "se_reduction")
        check_positive(self, "num_bottleneck", allow_zero=True)
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self._key('dropout')} must lie in [0, 1), got {self.dropout}")

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth * math.lcm(self.block_size, self.grid_size)


class _MaximLevel(nn.Module):
    """Conv1x1 -> num_groups x (MAB, RCAB) -> + long shortcut (MAXIM's UNetEncoderBlock)."""

    def __init__(self, in_dim: int, dim: int, c: MaximUNetConfig):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1, bias=c.bias)
        kw = {"bias": c.bias, "dropout": c.dropout}
        self.mabs = nn.ModuleList(
            MultiAxisGatedMLPBlock(dim, c.block_size, c.grid_size, **kw)
            for _ in range(c.num_groups)
        )
        self.rcabs = nn.ModuleList(RCAB(dim, c.se_reduction, c.bias) for _ in range(c.num_groups))

    def forward(self, x: Tensor) -> Tensor:
        x = shortcut = self.proj(x)
        for mab, rcab in zip(self.mabs, self.rcabs, strict=True):
            x = rcab(_nhwc(mab, x))
        return x + shortcut


class MaximUNet(nn.Module):
    """A small single-stage MAXIM: UNet of multi-axis gated MLP blocks with cross-gating.

    "MAXIM: Multi-Axis MLP for Image Processing" (Tu et al.; arXiv 2201.02973), following
    the layout of ``google-research/maxim`` (``MAXIM`` with one stage):

    - Conv3x3 in; encoder level i (2^i F channels): Conv1x1 -> num_groups x (MAB + RCAB)
      + long shortcut, then Conv4x4 stride 2 down.
    - Bottleneck: num_bottleneck x (MAB + RDCAB) at 2^depth F.
    - Skip fusion, deepest first: every encoder output is resized to level i (bilinear +
      Conv1x1 to 2^i F), the maps are concatenated, and a :class:`CrossGatingBlock` gates
      them against the global feature (the bottleneck, upsampled 2x; then each CGB's y
      output), giving the bridge of level i.
    - Decoder level i: ConvT2x2 up, concatenate the bridge, then the encoder-level block.
    - Conv3x3 out + the input (residual learning).

    Departures, to fit a CPU: one stage (no SAM or cross-stage CGBs; MAXIM-3S has three),
    no multi-scale inputs/outputs, one block and grid size at every level (the code uses
    16 at high resolution and 8 below), and small widths. Training loss is the caller's
    choice (the paper's Charbonnier + frequency loss is not in the released code).
    """

    def __init__(self, config: MaximUNetConfig):
        super().__init__()
        if not isinstance(config, MaximUNetConfig):
            raise TypeError(f"MaximUNet takes a MaximUNetConfig, got {type(config).__name__}")
        self.config = c = config
        widths = [c.features * 2**i for i in range(c.depth + 1)]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1, bias=c.bias)
        self.encoders = nn.ModuleList(_MaximLevel(widths[i], widths[i], c) for i in range(c.depth))
        self.downs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1, bias=c.bias)
            for i in range(c.depth)
        )
        kw = {"bias": c.bias, "dropout": c.dropout}
        wb = widths[c.depth]
        self.bottleneck_mabs = nn.ModuleList(
            MultiAxisGatedMLPBlock(wb, c.block_size, c.grid_size, **kw)
            for _ in range(c.num_bottleneck)
        )
        self.bottleneck_rdcabs = nn.ModuleList(
            RDCAB(wb, c.se_reduction, **kw) for _ in range(c.num_bottleneck)
        )
        # fuse[i][j]: encoder output j resized to level i
        self.fuse = nn.ModuleList(
            nn.ModuleList(nn.Conv2d(widths[j], widths[i], 1, bias=c.bias) for j in range(c.depth))
            for i in range(c.depth)
        )
        self.cross_gates = nn.ModuleList(
            CrossGatingBlock(
                widths[i],
                c.depth * widths[i],
                widths[i + 1],
                block_size=c.block_size,
                grid_size=c.grid_size,
                upsample_y=True,
                **kw,
            )
            for i in range(c.depth)
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2, bias=c.bias)
            for i in range(c.depth)
        )
        self.decoders = nn.ModuleList(
            _MaximLevel(2 * widths[i], widths[i], c) for i in range(c.depth)
        )
        self.conv_out = nn.Conv2d(widths[0], c.in_channels, 3, padding=1, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        why = f"2^depth * lcm(block_size, grid_size) = 2^{c.depth} * lcm({c.block_size}, "
        why += f"{c.grid_size})"
        _check_images(x, c.in_channels, c.multiple, "MaximUNet", why)
        h, skips = self.conv_in(x), []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            h = encoder(h)
            skips.append(h)
            h = down(h)
        for mab, rdcab in zip(self.bottleneck_mabs, self.bottleneck_rdcabs, strict=True):
            h = rdcab(_nhwc(mab, h))
        bridges, g = [None] * c.depth, h
        for i in reversed(range(c.depth)):
            size = skips[i].shape[-2:]
            signal = torch.cat(
                [
                    conv(F.interpolate(s, size=size, mode="bilinear", align_corners=False))
                    for conv, s in zip(self.fuse[i], skips, strict=True)
                ],
                dim=1,
            )
            bridge, g = self.cross_gates[i](signal.permute(0, 2, 3, 1), g.permute(0, 2, 3, 1))
            bridges[i], g = bridge.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2)
        for i in reversed(range(c.depth)):
            h = self.decoders[i](torch.cat([self.ups[i](h), bridges[i]], dim=1))
        return x + self.conv_out(h)

    def num_parameters(self) -> int:
        return num_parameters(self)


# -- convolutional baseline -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvUNetConfig(Config):
    """Every setting of :class:`ConvUNet`: the fields of :class:`MaximUNetConfig` that a
    convolutional UNet has (``features``, ``depth``, ``num_groups`` residual blocks per
    level, ``num_bottleneck`` residual blocks at the bottom)."""

    in_channels: int = 1
    features: int = 16
    depth: int = 2
    num_groups: int = 1
    num_bottleneck: int = 1
    bias: bool = True

    def validate(self) -> None:
        check_positive(self, "in_channels", "features", "depth", "num_groups")
        check_positive(self, "num_bottleneck", allow_zero=True)

    @property
    def multiple(self) -> int:
        return 2**self.depth


class ResBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(x))): the plain residual block of EDSR-style restorers."""

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)
        self.conv2 = nn.Conv2d(dim, dim, 3, padding=1, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))


class _ConvLevel(nn.Module):
    def __init__(self, in_dim: int, dim: int, c: ConvUNetConfig):
        super().__init__()
        self.proj = nn.Conv2d(in_dim, dim, 1, bias=c.bias)
        self.blocks = nn.Sequential(*(ResBlock(dim, c.bias) for _ in range(c.num_groups)))

    def forward(self, x: Tensor) -> Tensor:
        x = self.proj(x)
        return x + self.blocks(x)


class ConvUNet(nn.Module):
    """The baseline: :class:`MaximUNet`'s skeleton with convolutions only.

    Conv3x3 in; encoder level i: Conv1x1 -> num_groups residual blocks (conv3x3, ReLU,
    conv3x3) + long shortcut, Conv4x4 stride 2 down; num_bottleneck residual blocks;
    decoder: ConvT2x2 up, concatenate the encoder output of the level (a plain skip, no
    cross-gating), the encoder-level block; Conv3x3 out + the input. No paper: the common
    residual UNet of restoration work, sized by ``features`` to match a MAXIM UNet.
    """

    def __init__(self, config: ConvUNetConfig):
        super().__init__()
        if not isinstance(config, ConvUNetConfig):
            raise TypeError(f"ConvUNet takes a ConvUNetConfig, got {type(config).__name__}")
        self.config = c = config
        widths = [c.features * 2**i for i in range(c.depth + 1)]
        self.conv_in = nn.Conv2d(c.in_channels, widths[0], 3, padding=1, bias=c.bias)
        self.encoders = nn.ModuleList(_ConvLevel(widths[i], widths[i], c) for i in range(c.depth))
        self.downs = nn.ModuleList(
            nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1, bias=c.bias)
            for i in range(c.depth)
        )
        self.bottleneck = nn.Sequential(
            *(ResBlock(widths[c.depth], c.bias) for _ in range(c.num_bottleneck))
        )
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2, bias=c.bias)
            for i in range(c.depth)
        )
        self.decoders = nn.ModuleList(
            _ConvLevel(2 * widths[i], widths[i], c) for i in range(c.depth)
        )
        self.conv_out = nn.Conv2d(widths[0], c.in_channels, 3, padding=1, bias=c.bias)

    def forward(self, x: Tensor) -> Tensor:
        c = self.config
        _check_images(x, c.in_channels, c.multiple, "ConvUNet", f"2^depth = 2^{c.depth}")
        h, skips = self.conv_in(x), []
        for encoder, down in zip(self.encoders, self.downs, strict=True):
            h = encoder(h)
            skips.append(h)
            h = down(h)
        h = self.bottleneck(h)
        for i in reversed(range(c.depth)):
            h = self.decoders[i](torch.cat([self.ups[i](h), skips[i]], dim=1))
        return x + self.conv_out(h)

    def num_parameters(self) -> int:
        return num_parameters(self)
