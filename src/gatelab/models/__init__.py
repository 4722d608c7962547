"""Small complete models the recipes train, each configured by a plain-typed dataclass.

``MODELS`` maps a recipe's ``model = "lm"`` to its (config class, model class);
``build_model(name, table)`` checks the table and builds both.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from ..registry import Registry
from .classifier import LeNet5, LeNet5Config, MLPClassifier, MLPConfig, c3_connections
from .common import ModelOutput, moe_modules, num_active_parameters, num_parameters
from .config import FLAT_MOE_KEYS, Config, ConfigError, MoEConfig
from .ctr import DualMLP, FinalMLP, LogisticCTR
from .field import NeuralField
from .lm import (
    LM,
    LMConfig,
    apply_rope,
    dense_equivalent,
    rope_cache,
)
from .mixing import MixingClassifier, MixingClassifierConfig
from .mohets import DLinear, MoHETS, MoHETSConfig
from .multitask import (
    CGC,
    MULTITASK_MODELS,
    PLE,
    HoME,
    MMoE,
    MultiTaskModel,
    SharedBottom,
    expert_statistics,
)
from .one_layer import OneLayerTransformer

MODELS: Registry[tuple[type[Config], type[nn.Module]]] = Registry("model")
MODELS.register("lm")((LMConfig, LM))
MODELS.register("mlp")((MLPConfig, MLPClassifier))
MODELS.register("lenet5")((LeNet5Config, LeNet5))
MODELS.register("mixing")((MixingClassifierConfig, MixingClassifier))
MODELS.register("mohets")((MoHETSConfig, MoHETS))


def build_model(name: str, table: Mapping[str, Any] | None = None) -> tuple[Config, nn.Module]:
    """(config, model) for the model registered as ``name``, configured by ``table``.

    Raises ValueError for an unknown name (listing the valid ones) and ConfigError for an
    unknown key (naming the nearest valid one) or a value of the wrong type.
    """
    config_cls, model_cls = MODELS.get(name)
    config = config_cls.from_dict(table or {})
    return config, model_cls(config)


def upgrade_model_table(table: Mapping[str, Any]) -> dict[str, Any]:
    """A recipe's ``[model]`` table (``kind`` included) in today's layout: the flat keys an
    earlier version wrote (``num_experts = 8`` directly in ``[model]``) moved into their
    nested table (``[model.moe]``), without a warning. Tables already in today's layout
    and unknown kinds come back unchanged (as a copy)."""
    kind = table.get("kind", "lm")
    if kind not in MODELS.names():
        return dict(table)
    return MODELS.get(kind)[0].upgrade_table(table)


__all__ = [
    "CGC",
    "DualMLP",
    "FinalMLP",
    "HoME",
    "LogisticCTR",
    "MMoE",
    "MULTITASK_MODELS",
    "MultiTaskModel",
    "NeuralField",
    "PLE",
    "SharedBottom",
    "expert_statistics",
    "DLinear",
    "MoHETS",
    "MoHETSConfig",
    "OneLayerTransformer",
    "MixingClassifier",
    "MixingClassifierConfig",
    "LM",
    "MODELS",
    "Config",
    "ConfigError",
    "FLAT_MOE_KEYS",
    "MoEConfig",
    "LMConfig",
    "LeNet5",
    "LeNet5Config",
    "MLPClassifier",
    "MLPConfig",
    "ModelOutput",
    "apply_rope",
    "build_model",
    "upgrade_model_table",
    "c3_connections",
    "dense_equivalent",
    "moe_modules",
    "num_active_parameters",
    "num_parameters",
    "rope_cache",
]


def __getattr__(name: str) -> Any:
    # SwiGLU and CausalSelfAttention are gone (issue 14); lm's __getattr__ warns and maps them.
    if name in ("SwiGLU", "CausalSelfAttention"):
        from . import lm

        return getattr(lm, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
