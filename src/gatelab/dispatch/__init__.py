"""Dispatchers: get each token to its experts and the weighted outputs back.

A dispatcher is ``fn(x [T, D], experts [T, K], weights [T, K], bank: ExpertWeights,
deterministic) -> [T, D]``. It reads only the slot half of a Routing, so HF's experts
interface, which passes (top_k_index, top_k_weights), can call it unchanged.
"""

from __future__ import annotations

from ..registry import Registry
from .expert_parallel import ExpertParallel, layer_bytes
from .grouped import grouped_dispatch, grouped_linear, grouped_mm_supported
from .loop import loop_dispatch
from .triton import triton_available, triton_dispatch
from .workspace import release_workspace

DISPATCHERS = Registry("dispatcher")
DISPATCHERS.register("loop")(loop_dispatch)
DISPATCHERS.register("grouped")(grouped_dispatch)
DISPATCHERS.register("triton")(triton_dispatch)


# The triton kernels have so far run only in triton's CPU interpreter: "auto" keeps the
# measured grouped dispatcher on CUDA until benchmarks/gpu_check.py has passed on a GPU
# (correctness against the loop oracle in bf16 and the speed targets). Then set this to
# True; until then ask for dispatcher="triton" explicitly.
TRITON_IN_AUTO = False


def auto_dispatch(x, experts, weights, bank, deterministic: bool = True):
    """The grouped dispatcher; on CUDA the triton one instead once ``TRITON_IN_AUTO`` is set
    (never on CPU, where triton kernels would only run in its interpreter)."""
    if TRITON_IN_AUTO and x.is_cuda and triton_available():
        return triton_dispatch(x, experts, weights, bank, deterministic)
    return grouped_dispatch(x, experts, weights, bank, deterministic)


def get_dispatcher(name: str):
    """The dispatcher registered under ``name``; "auto" picks the fastest for any device."""
    if name == "auto":
        return auto_dispatch
    if name not in DISPATCHERS:
        valid = ", ".join(["auto", *DISPATCHERS.names()])
        raise ValueError(f"unknown dispatcher {name!r}; valid names are: {valid}")
    return DISPATCHERS.get(name)


__all__ = [
    "DISPATCHERS",
    "auto_dispatch",
    "ExpertParallel",
    "get_dispatcher",
    "grouped_dispatch",
    "grouped_linear",
    "grouped_mm_supported",
    "layer_bytes",
    "loop_dispatch",
    "release_workspace",
    "triton_available",
    "triton_dispatch",
]
