"""Blocks: the nn.Modules users put in models (complete models are in gatelab.models)."""

from ..legacy import moved
from .attention import ATTN_GATES, GatedAttention, apply_rope, rope_cache
from .conv import BaseConv, LongConv, ShortConv
from .ctr import (
    FeatureSelection,
    FieldEmbedding,
    InteractionAggregation,
    MLPStack,
    mlp_parameter_count,
)
from .field import CoordinateAwareModulation, FourierFeatures, pixel_coords
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
    "CoordinateAwareModulation",
    "FourierFeatures",
    "pixel_coords",
    "SelectiveMultiHeadAttention",
    "FeatureSelection",
    "FieldEmbedding",
    "InteractionAggregation",
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

# Complete models moved to gatelab.models and weight converters to gatelab.convert (issue
# 14); the old names import with a warning.
__getattr__ = moved(
    __name__,
    {
        **dict.fromkeys(("DualMLP", "FinalMLP", "LogisticCTR"), "gatelab.models.ctr"),
        **dict.fromkeys(
            ("CGC", "PLE", "HoME", "MMoE", "SharedBottom", "expert_statistics"),
            "gatelab.models.multitask",
        ),
        "NeuralField": "gatelab.models.field",
        **dict.fromkeys(("decompose_mlp", "decompose_to_moe", "uoe_mlp"), "gatelab.convert.uoe"),
        **dict.fromkeys(("moe_to_wide", "wide_to_moe"), "gatelab.convert.wide"),
    },
)
