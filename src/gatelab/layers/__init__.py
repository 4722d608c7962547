"""nn.Modules users put in models."""

from ..legacy import moved
from .attention import ATTN_GATES, GatedAttention, apply_rope, rope_cache
from .conv import BaseConv, LongConv, ShortConv
from .ctr import (
    DualMLP,
    FeatureSelection,
    FieldEmbedding,
    FinalMLP,
    InteractionAggregation,
    LogisticCTR,
    MLPStack,
    mlp_parameter_count,
)
from .field import CoordinateAwareModulation, FourierFeatures, NeuralField, pixel_coords
from .kan import GRKANMLP, SKAN, GroupRational, SKANLayer
from .maxim_mlp import (
    CrossGatingBlock,
    MaximGmlpLayer,
    MultiAxisGatedMLPBlock,
    SpatialGatingWeights,
)
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
    SharedExpert,
)
from .moe import MoE
from .multitask import CGC, PLE, HoME, MMoE, SharedBottom, expert_statistics
from .retention import GatedRetention
from .token_mixing import (
    ActivatorBlock,
    ActivatorGatingUnit,
    GMLPBlock,
    MixerBlock,
    MixerGatingUnit,
    NiNformerBlock,
    RaftLevel,
    SpatialGatingUnit,
)
from .uoe import SelectiveMultiHeadAttention
from .wide_mlp import (
    WideMLP,
    block_gates,
    mask_to_routing,
    moex_layer,
    routing_mask,
)

__all__ = [
    "CGC",
    "PLE",
    "HoME",
    "MMoE",
    "SharedBottom",
    "expert_statistics",
    "CoordinateAwareModulation",
    "FourierFeatures",
    "NeuralField",
    "pixel_coords",
    "SelectiveMultiHeadAttention",
    "DualMLP",
    "FeatureSelection",
    "FieldEmbedding",
    "FinalMLP",
    "InteractionAggregation",
    "LogisticCTR",
    "MLPStack",
    "mlp_parameter_count",
    "BaseConv",
    "GRKANMLP",
    "GatedRetention",
    "GroupRational",
    "LongConv",
    "SKAN",
    "SKANLayer",
    "ShortConv",
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
    "WideMLP",
    "block_gates",
    "mask_to_routing",
    "moex_layer",
    "routing_mask",
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
    "SharedExpert",
    "apply_rope",
    "rope_cache",
    "MoE",
]

# Weight converters moved to gatelab.convert (issue 14); the old names import with a warning.
__getattr__ = moved(
    __name__,
    {
        **dict.fromkeys(("decompose_mlp", "decompose_to_moe", "uoe_mlp"), "gatelab.convert.uoe"),
        **dict.fromkeys(("moe_to_wide", "wide_to_moe"), "gatelab.convert.wide"),
    },
)
