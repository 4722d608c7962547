"""Routers and everything that reads their decisions: the Routing contract, capacity, losses."""

from .aux_free import attach_bias_update, update_expert_bias
from .capacity import apply_capacity, expert_capacity
from .dense_to_sparse import DenseToSparseRouter
from .dynamic import (
    K_SCHEDULES,
    DynamicKRouter,
    TopPRouter,
    experts_per_token,
    resolve_k_schedule,
)
from .losses import (
    LOSSES,
    cv_squared,
    importance_loss,
    load_loss,
    switch_balance_loss,
    z_loss,
)
from .routers import (
    ROUTERS,
    ExpertChoiceRouter,
    HashRouter,
    Router,
    SigmoidRouter,
    TopKRouter,
    TopKSoftmaxRouter,
)
from .routing import EMPTY, FlatRouting, Routing
from .schedules import SCHEDULES, Schedule, attach_schedule, build_schedule, step_schedules
from .sparsity_aware import SparsityAwareRouter
from .temperature import (
    GATE_ACTIVATIONS,
    ActivationTemperatureRouter,
    TemperatureRouter,
    activation_scores,
    temperature_scores,
)
from .uoe import AllExpertsRouter, PatchSelectionRouter, UoERouter

__all__ = [
    "AllExpertsRouter",
    "PatchSelectionRouter",
    "UoERouter",
    "K_SCHEDULES",
    "DynamicKRouter",
    "SparsityAwareRouter",
    "TopPRouter",
    "experts_per_token",
    "resolve_k_schedule",
    "EMPTY",
    "GATE_ACTIVATIONS",
    "LOSSES",
    "ROUTERS",
    "SCHEDULES",
    "ActivationTemperatureRouter",
    "DenseToSparseRouter",
    "ExpertChoiceRouter",
    "FlatRouting",
    "HashRouter",
    "Router",
    "Routing",
    "Schedule",
    "SigmoidRouter",
    "TemperatureRouter",
    "TopKRouter",
    "TopKSoftmaxRouter",
    "activation_scores",
    "apply_capacity",
    "attach_bias_update",
    "attach_schedule",
    "build_schedule",
    "cv_squared",
    "expert_capacity",
    "importance_loss",
    "load_loss",
    "step_schedules",
    "switch_balance_loss",
    "temperature_scores",
    "update_expert_bias",
    "z_loss",
]
