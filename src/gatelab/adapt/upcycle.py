"""Deprecated: upcycling moved to :mod:`gatelab.convert.upcycle` (issue 14)."""

from ..convert import upcycle as _upcycle
from ..legacy import moved

# Old name -> new place, for this module and for ``gatelab.adapt``. The reader of a dense
# FFN is gatelab.experts.read_dense_ffn now (ExpertWeights, [1, ...] shapes).
MOVED = {
    **dict.fromkeys(_upcycle.__all__, "gatelab.convert.upcycle"),
    "dense_ffn_weights": "gatelab.experts:read_dense_ffn",
    "DenseFFN": "gatelab.experts:ExpertWeights",
    "activation_name": "gatelab.experts",
}

__getattr__ = moved(__name__, MOVED)
