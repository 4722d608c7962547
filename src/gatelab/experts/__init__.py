"""Expert weight banks (fused [E, ...] parameters) and shared experts."""

from .activation import (
    ACTIVATION_NAMES,
    GLU,
    AutogradActivation,
    ExpertActivation,
    Plain,
    as_activation,
)
from .bank import EXPERT_BANKS, ExpertBank, ExpertWeights, activation
from .shared import SharedExpert

__all__ = [
    "ACTIVATION_NAMES",
    "AutogradActivation",
    "ExpertActivation",
    "GLU",
    "Plain",
    "as_activation",
    "EXPERT_BANKS",
    "ExpertBank",
    "ExpertWeights",
    "SharedExpert",
    "activation",
]
