"""Dense <-> MoE weight conversions.

- :mod:`~gatelab.convert.upcycle`: a trained dense FFN copied into E experts (sparse
  upcycling), EvoMoE's expert diversify, a whole dense LM upcycled with its optimizer state.
- :mod:`~gatelab.convert.wide`: an MoE's routed experts as one wide masked MLP and back
  (MoE-X's view).
- :mod:`~gatelab.convert.uoe`: UoE's equivalent decomposition of a dense MLP into experts.

Every converter reads a dense FFN through :func:`gatelab.experts.read_dense_ffn`, the one
reader into expert-bank layout.
"""

from .uoe import decompose_mlp, decompose_to_moe, uoe_mlp
from .upcycle import (
    copy_into_bank,
    diversify_experts,
    init_router,
    upcycle_ffn,
    upcycle_lm,
    upcycle_optimizer_state,
)
from .wide import moe_to_wide, wide_to_moe

__all__ = [
    "copy_into_bank",
    "decompose_mlp",
    "decompose_to_moe",
    "diversify_experts",
    "init_router",
    "moe_to_wide",
    "uoe_mlp",
    "upcycle_ffn",
    "upcycle_lm",
    "upcycle_optimizer_state",
    "wide_to_moe",
]
