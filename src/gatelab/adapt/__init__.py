"""Cheap changes to a trained model: dense -> MoE upcycling, EvoMoE's expert diversify,
and transcoders (a sparse replacement of one MLP/MoE layer)."""

from .transcoder import Transcoder, evaluate_transcoder, train_transcoder
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
    "Transcoder",
    "activation_name",
    "copy_into_bank",
    "dense_ffn_weights",
    "diversify_experts",
    "evaluate_transcoder",
    "init_router",
    "train_transcoder",
    "upcycle_ffn",
    "upcycle_lm",
    "upcycle_optimizer_state",
]
