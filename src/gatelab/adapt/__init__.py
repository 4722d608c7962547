"""Cheap changes to a trained model: dense -> MoE upcycling and EvoMoE's expert diversify."""

from .upcycle import (
    DenseFFN,
    activation_name,
    copy_into_bank,
    dense_ffn_weights,
    diversify_experts,
    init_router,
    upcycle_ffn,
    upcycle_lm,
    upcycle_optimizer_state,
)

__all__ = [
    "DenseFFN",
    "activation_name",
    "copy_into_bank",
    "dense_ffn_weights",
    "diversify_experts",
    "init_router",
    "upcycle_ffn",
    "upcycle_lm",
    "upcycle_optimizer_state",
]
