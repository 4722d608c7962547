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
from .prune import expert_importance, prune_model, restrict_experts, select_experts
from .steer import clamp_neurons, force_on, steer_experts, switch_off

__all__ = [
    "BlockAdapter",
    "Edit",
    "EditHandle",
    "GatelabAdapter",
    "MoEBlock",
    "NoMoEBlocksError",
    "RoutingCapture",
    "adapters",
    "capture_routing",
    "clamp_neurons",
    "compose",
    "edit_routing",
    "expert_importance",
    "find_moe_blocks",
    "force_on",
    "prune_model",
    "register_adapter",
    "restrict_experts",
    "select_blocks",
    "select_experts",
    "steer_experts",
    "switch_off",
]
