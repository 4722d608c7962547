"""Expert weight banks (fused [E, ...] parameters) and the one reader of a dense FFN into them."""

from ..legacy import moved
from .activation import (
    ACTIVATION_NAMES,
    GLU,
    AutogradActivation,
    ExpertActivation,
    Plain,
    as_activation,
)
from .bank import EXPERT_BANKS, ExpertBank, ExpertWeights, activation
from .dense import UnreadableFFNError, activation_name, read_dense_ffn

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
    "activation",
    "activation_name",
    "read_dense_ffn",
    "UnreadableFFNError",
]

# SharedExpert is a dense FFN of gatelab.layers.mlp now (experts/ sits above layers/).
__getattr__ = moved(__name__, {"SharedExpert": "gatelab.layers.mlp"})
