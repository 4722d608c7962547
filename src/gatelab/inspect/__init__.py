"""Tools that look at routing decisions: telemetry, the access layer over any model's MoE
blocks (gatelab's and HF's), profiling by prompt set, contrastive localisation, plots."""

from .access import (
    MoEBlock,
    NoMoEBlocksError,
    RoutingCapture,
    capture_routing,
    edit_routing,
    find_moe_blocks,
)
from .readout import read_neurons, read_vectors, readout_accuracy
from .telemetry import RoutingMonitor, routing_stats

__all__ = [
    "MoEBlock",
    "NoMoEBlocksError",
    "RoutingCapture",
    "RoutingMonitor",
    "capture_routing",
    "edit_routing",
    "find_moe_blocks",
    "read_neurons",
    "read_vectors",
    "readout_accuracy",
    "routing_stats",
]
