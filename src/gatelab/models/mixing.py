"""Patch-based image classifiers built from the token-mixing blocks of
:mod:`gatelab.layers.token_mixing`: one config, ``block`` = "gmlp" | "mixer" | "raft" |
"ninformer" | "activator".

Images [B, C, H, W] -> non-overlapping patches (a conv with kernel = stride = patch_size, as
MLP-Mixer's per-patch linear embedding) -> tokens [B, (H/p) * (W/p), dim] -> ``depth``
blocks -> LayerNorm -> mean over tokens -> Linear to ``num_classes``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from torch import Tensor, nn

from ..experts import ACTIVATION_NAMES
from ..layers.token_mixing import (
    ActivatorBlock,
    GMLPBlock,
    MixerBlock,
    NiNformerBlock,
    RaftLevel,
)
from .classifier import _classifier_output
from .common import ModelOutput, as_images, num_parameters
from .config import Config, ConfigError, check_choice, check_positive

BLOCK_KINDS = ("gmlp", "mixer", "raft", "ninformer", "activator")


@dataclasses.dataclass(frozen=True)
class MixingClassifierConfig(Config):
    """Every setting of :class:`MixingClassifier`; the keys of a recipe's ``[model]`` table.

    ``image_size`` (square, H = W), ``in_channels``, ``patch_size`` (must divide
    image_size), ``num_classes``; ``block`` picks the token-mixing block, ``depth`` how
    many; ``dim`` the token width; ``hidden_dim`` the block's MLP width (gMLP: before the
    gating unit's split; Mixer / NiNformer / Activator: the MLPs' width; RaftMLP: the
    channel MLP). ``token_hidden_dim`` sets the Mixer's token-MLP width (0: hidden_dim).
    ``raft_size`` and ``token_expansion`` are RaftMLP's r and e (r must divide dim).
    """

    image_size: int = 8
    in_channels: int = 1
    patch_size: int = 2
    num_classes: int = 10
    block: Literal["gmlp", "mixer", "raft", "ninformer", "activator"] = "gmlp"
    depth: int = 4
    dim: int = 64
    hidden_dim: int = 128
    token_hidden_dim: int = 0
    raft_size: int = 2
    token_expansion: int = 2
    act: str = "gelu"
    bias: bool = True
    dropout: float = 0.0

    def validate(self) -> None:
        check_positive(self, "image_size", "in_channels", "patch_size", "num_classes")
        check_positive(self, "depth", "dim", "hidden_dim", "raft_size", "token_expansion")
        check_positive(self, "token_hidden_dim", allow_zero=True)
        check_choice(self._key("act"), self.act, ACTIVATION_NAMES)
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"{self._key('patch_size')}={self.patch_size} does not divide "
                f"image_size={self.image_size}; choose a patch size that divides it"
            )
        if self.block == "raft" and self.dim % self.raft_size:
            raise ConfigError(
                f"{self._key('dim')}={self.dim} must be divisible by raft_size="
                f"{self.raft_size} for block 'raft'; change dim or raft_size"
            )
        if self.block == "gmlp" and self.hidden_dim % 2:
            raise ConfigError(
                f"{self._key('hidden_dim')}={self.hidden_dim} must be even for block 'gmlp' "
                "(the spatial gating unit splits it in two)"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{self._key('dropout')} must lie in [0, 1), got {self.dropout}")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid**2


def build_block(config: MixingClassifierConfig) -> nn.Module:
    """One token-mixing block of ``config.block`` for ``config``'s token grid."""
    c = config
    kw = {"act": c.act, "bias": c.bias, "dropout": c.dropout}
    if c.block == "gmlp":
        return GMLPBlock(c.dim, c.hidden_dim, c.num_tokens, **kw)
    if c.block == "mixer":
        token_hidden = c.token_hidden_dim or c.hidden_dim
        return MixerBlock(c.dim, c.hidden_dim, c.num_tokens, token_hidden_dim=token_hidden, **kw)
    if c.block == "raft":
        return RaftLevel(
            c.dim,
            c.grid,
            c.grid,
            raft_size=c.raft_size,
            hidden_dim=c.hidden_dim,
            token_expansion=c.token_expansion,
            **kw,
        )
    if c.block == "ninformer":
        return NiNformerBlock(c.dim, c.hidden_dim, c.num_tokens, **kw)
    return ActivatorBlock(c.dim, c.hidden_dim, **kw)


class MixingClassifier(nn.Module):
    """Patch embedding -> ``depth`` token-mixing blocks -> LN -> mean pool -> Linear.

    The skeleton MLP-Mixer (arXiv 2105.01601), gMLP (arXiv 2105.08050), NiNformer and
    Activator use for images, with the block chosen by ``config.block``. Departures: one
    level (RaftMLP's hierarchy of four levels with patch merging, and its cross-scale
    embedding, are not built: the 8x8 digits have only a 4x4 token grid at patch 2).
    Inputs [B, C, H, W], [B, H, W] (one channel) or flattened [B, C*H*W].
    """

    def __init__(self, config: MixingClassifierConfig):
        super().__init__()
        if not isinstance(config, MixingClassifierConfig):
            raise TypeError(
                f"MixingClassifier takes a MixingClassifierConfig, got {type(config).__name__}"
            )
        self.config = config
        c = config
        self.embed = nn.Conv2d(c.in_channels, c.dim, c.patch_size, stride=c.patch_size)
        self.blocks = nn.Sequential(*(build_block(c) for _ in range(c.depth)))
        self.norm = nn.LayerNorm(c.dim)
        self.head = nn.Linear(c.dim, c.num_classes)

    def extra_repr(self) -> str:
        c = self.config
        return f"block={c.block!r}, tokens={c.num_tokens}, depth={c.depth}"

    def forward(self, x: Tensor, targets: Tensor | None = None) -> ModelOutput:
        tokens = self.embed(self._as_images(x)).flatten(2).transpose(1, 2)
        pooled = self.norm(self.blocks(tokens)).mean(dim=1)
        return _classifier_output(self, self.head(pooled), targets)

    def _as_images(self, x: Tensor) -> Tensor:
        c = self.config
        return as_images(
            x, c.in_channels, c.image_size, "MixingClassifier", "MixingClassifierConfig"
        )

    def num_parameters(self) -> int:
        return num_parameters(self)
