"""Deprecated: upcycling moved to :mod:`gatelab.convert.upcycle` (issue 14)."""

from ..legacy import moved

_CONVERT = (
    "copy_into_bank",
    "diversify_experts",
    "init_router",
    "upcycle_ffn",
    "upcycle_lm",
    "upcycle_optimizer_state",
)
# The reader of a dense FFN is gatelab.experts.read_dense_ffn (ExpertWeights, [1, ...] shapes).
_EXPERTS = {
    "dense_ffn_weights": "gatelab.experts:read_dense_ffn",
    "DenseFFN": "gatelab.experts:ExpertWeights",
    "activation_name": "gatelab.experts",
}

__getattr__ = moved(__name__, {**dict.fromkeys(_CONVERT, "gatelab.convert.upcycle"), **_EXPERTS})
