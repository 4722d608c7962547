"""nn.Modules users put in models."""

from .attention import ATTN_GATES, GatedAttention, apply_rope, rope_cache
from .mlp import (
    GLU_VARIANTS,
    MLPS,
    BottleneckBlock,
    BottleneckMLP,
    GluMlp,
    HourglassBlock,
    HourglassFFN,
    HourglassMLP,
    Mlp,
    ResidualMlpBlock,
)
from .moe import MoE

__all__ = [
    "ATTN_GATES",
    "GLU_VARIANTS",
    "MLPS",
    "BottleneckBlock",
    "BottleneckMLP",
    "GatedAttention",
    "GluMlp",
    "HourglassBlock",
    "HourglassFFN",
    "HourglassMLP",
    "Mlp",
    "ResidualMlpBlock",
    "apply_rope",
    "rope_cache",
    "MoE",
]
