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
    "compose",
    "edit_routing",
    "find_moe_blocks",
    "register_adapter",
    "select_blocks",
]
