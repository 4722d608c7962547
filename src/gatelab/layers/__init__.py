"""nn.Modules users put in models."""

from .moe import MoE

__all__ = ["MoE"]
