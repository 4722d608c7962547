"""Moved: the multi-task models are complete models and live in :mod:`gatelab.models.multitask`
(issue 14). The old import path still works, with a DeprecationWarning naming the new one."""

from __future__ import annotations

from ..legacy import moved

_NAMES = (
    "CGC",
    "HoME",
    "MMoE",
    "MULTITASK_MODELS",
    "PLE",
    "ExpertGroup",
    "FeatureGate",
    "MultiTaskModel",
    "SharedBottom",
    "expert_statistics",
)
__getattr__ = moved(__name__, dict.fromkeys(_NAMES, "gatelab.models.multitask"))
