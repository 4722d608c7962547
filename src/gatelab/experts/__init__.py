"""Expert weight banks (fused [E, ...] parameters) and shared experts."""

from .bank import ACTIVATIONS, EXPERT_BANKS, ExpertBank, ExpertWeights, activation, glu
from .shared import SharedExpert

__all__ = [
    "ACTIVATIONS",
    "EXPERT_BANKS",
    "ExpertBank",
    "ExpertWeights",
    "SharedExpert",
    "activation",
    "glu",
]
