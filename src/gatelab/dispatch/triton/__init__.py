"""The triton dispatcher: ScatterMoE-style fused gather + grouped GEMM kernels for CUDA.

Follows ScatterMoE (Tan et al., "Scattered Mixture-of-Experts Implementation",
arXiv 2403.08245): the slots are sorted by expert once, and every kernel reads token rows
in place through the sorted index instead of copying them into a permuted or padded
buffer; the weight gradient is a per-expert reduction over the same index (ScatterMoE's
``groupXtY``). Departures from the paper's kernels, and why:

- the activation (GLU act(gate) * up, or a plain act) and the routing weight are applied
  in the up-projection's epilogue, so the [N, F] activation is written once and the down
  projection needs no epilogue but the bias (ScatterMoE applies the weight at the end);
- the combine is deterministic on request: the down projection scatters each row to its
  slot's row of a [T*K, D] buffer (a permutation: no two programs write one row) and
  the k slot rows of a token are summed in slot order; with ``deterministic=False`` it
  atomically adds into [T, D] fp32 (ScatterMoE's only mode for k > 1 is the former);
- a decode table (one program per (expert, output block), the expert's few rows looped
  inside, so each weight tile is read once) replaces the row-block table when at most
  ``DECODE_SLOTS`` slots are routed, the regime where a GEMM is bound by weight reads;
- block sizes come from a small table per GPU family (``configs.py``) that
  ``triton.autotune`` searches, instead of a fixed config.

Experts whose activation is not a named GLU/Plain activation (an arbitrary callable), and
float64, run through the grouped dispatcher instead: the kernels need the activation's
formula and tl.dot has no float64 path on most GPUs.

Importing this package does not import triton; the first call does. The kernels run on
CUDA tensors, or on CPU tensors when triton was imported with TRITON_INTERPRET=1 (how the
tests check them without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import Tensor

from ...experts.activation import GLU, Plain
from ...experts.bank import ExpertWeights

_ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}  # = kernels.ACT_CODES


def triton_available() -> bool:
    """Whether triton is installed (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether the kernels run in triton's interpreter (on CPU tensors): fixed when the
    kernels are first imported, by TRITON_INTERPRET at that moment."""
    import sys

    loaded = sys.modules.get(f"{__name__}.function")
    if loaded is not None:
        return loaded.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def kernel_activation(activate) -> tuple[int, bool] | None:
    """(activation code, glu) for a named GLU/Plain activation; None for other callables."""
    if isinstance(activate, (GLU, Plain)) and activate.name in _ACT_CODES:
        return _ACT_CODES[activate.name], isinstance(activate, GLU)
    return None


def triton_dispatch(
    x: Tensor, experts: Tensor, weights: Tensor, bank: ExpertWeights, deterministic: bool = True
) -> Tensor:
    """Sum over slots of weight * expert(x) for x [T, D], experts/weights [T, K], in triton."""
    from ..checks import check_dispatch_inputs
    from ..grouped import grouped_dispatch

    if not triton_available():
        raise RuntimeError(
            "dispatcher 'triton' needs triton (pip install 'gatelab[gpu]'); "
            "use dispatcher='grouped' or 'auto'"
        )
    if x.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"dispatcher 'triton' runs on CUDA tensors, got x on {x.device}; use "
            "dispatcher='auto' (grouped off CUDA), or set TRITON_INTERPRET=1 before the first "
            "triton dispatch to run the kernels on CPU for testing"
        )
    check_dispatch_inputs(x, experts, weights, bank)
    act = kernel_activation(bank.activate)
    if act is None or bank.w_in.dtype == torch.float64:
        return grouped_dispatch(x, experts, weights, bank, deterministic)
    from . import function

    return function.run(x, experts, weights, bank, *act, deterministic)


__all__ = ["interpreting", "kernel_activation", "triton_available", "triton_dispatch"]
