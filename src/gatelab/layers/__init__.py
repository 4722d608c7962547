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
from .wide_mlp import (
    WideMLP,
    block_gates,
    mask_to_routing,
    moe_to_wide,
    moex_layer,
    routing_mask,
    wide_to_moe,
)

__all__ = [
    "WideMLP",
    "block_gates",
    "mask_to_routing",
    "moe_to_wide",
    "moex_layer",
    "routing_mask",
    "wide_to_moe",
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
