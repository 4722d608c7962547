"""Edit trained MoE models, gatelab's and Hugging Face's, through one access layer.

:mod:`gatelab.inspect.access` (re-exported here) finds the MoE blocks of a model, captures
their exact Routing and applies ``Routing -> Routing`` edits; the tools (steer, prune, ...)
are built on it.
"""

from ..inspect.access import (
    BlockAdapter,
    Edit,
    EditHandle,
    GatelabAdapter,
    MoEBlock,
    NoMoEBlocksError,
    RoutingCapture,
    adapters,
    capture_routing,
    compose,
    edit_routing,
    find_moe_blocks,
    register_adapter,
    select_blocks,
)
from .offload import OffloadedExperts, resident_expert_bytes
from .pregate import PreGates, pregate_hit_rate, train_pregates
from .prune import expert_importance, prune_model, restrict_experts, select_experts
from .skip import layer_importance, search_thresholds, skip_experts
from .steer import clamp_neurons, force_on, steer_experts, switch_off

__all__ = [
    "BlockAdapter",
    "Edit",
    "EditHandle",
    "GatelabAdapter",
    "MoEBlock",
    "NoMoEBlocksError",
    "OffloadedExperts",
    "PreGates",
    "RoutingCapture",
    "adapters",
    "capture_routing",
    "clamp_neurons",
    "compose",
    "edit_routing",
    "expert_importance",
    "find_moe_blocks",
    "force_on",
    "layer_importance",
    "pregate_hit_rate",
    "prune_model",
    "register_adapter",
    "resident_expert_bytes",
    "restrict_experts",
    "select_blocks",
    "search_thresholds",
    "select_experts",
    "skip_experts",
    "steer_experts",
    "switch_off",
    "train_pregates",
]
