"""The one input check every dispatcher runs first (loop, grouped, triton, expert parallel).

Shapes and dtypes are checked always: they are Python metadata and cost nothing. Expert
ids are checked against ``EMPTY .. num_experts - 1`` as ``Routing`` checks them:

- on CPU with a min/max reduction read on the host (no stream to stall; for a few
  slots, from a Python list), raising a one-line ``ValueError``;
- on accelerators with ``torch._assert_async``, a device-side assertion: a forward never
  waits for the device, and a bad id stops the stream with the message instead of reading
  rows no expert wrote (the error surfaces at the next synchronisation, as a RuntimeError);
- not at all under ``torch.compile`` (a data-dependent branch would break the graph);
  ``sort_slots`` still treats any id outside the range as an empty slot (a padding row
  whose output is dropped), so no unwritten scratch row reaches an output.

The dtype rule: the input ``x`` must have the experts' dtype, because a dispatcher either
computes in one of the two dtypes silently or fails deep inside a matmul. Under
``torch.autocast`` for x's device the mismatch is autocast's doing and is allowed; the
dispatchers then return x's dtype.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..experts.bank import ExpertWeights
from ..routing import EMPTY
from ..routing.routing import HOST_CHECK_SLOTS


def _shape(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, Tensor) else type(t).__name__


def check_dispatch_inputs(
    x: Tensor, experts: Tensor, weights: Tensor, bank: ExpertWeights, num_experts: int | None = None
) -> None:
    """Raise a one-line ValueError for dispatcher inputs no dispatcher can run correctly.

    ``num_experts`` is the range of valid ids when it differs from ``bank.num_experts``
    (expert parallelism: global ids, a local bank).
    """
    num_experts = bank.num_experts if num_experts is None else num_experts
    _check_shapes(x, experts, weights, bank)
    _check_dtypes(x, experts, weights, bank)
    _check_ids(experts, num_experts)


def _check_shapes(x, experts, weights, bank: ExpertWeights) -> None:
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"dispatch input x must be a 2-D tensor [tokens, dim], got {_shape(x)}")
    if x.shape[1] != bank.dim:
        raise ValueError(
            f"dispatch input x has dim {x.shape[1]} but the experts take dim {bank.dim}; "
            "pass x [tokens, dim] with the bank's dim"
        )
    for name, t in (("experts", experts), ("weights", weights)):
        if not isinstance(t, Tensor) or t.dim() != 2 or t.shape[0] != x.shape[0]:
            raise ValueError(
                f"dispatch {name} must be [tokens={x.shape[0]}, top_k], got {_shape(t)}"
            )
    if experts.shape != weights.shape:
        raise ValueError(
            f"dispatch experts {tuple(experts.shape)} and weights {tuple(weights.shape)} "
            "must have the same [tokens, top_k] shape"
        )


def _check_dtypes(x, experts, weights, bank: ExpertWeights) -> None:
    if experts.is_floating_point() or experts.is_complex() or experts.dtype == torch.bool:
        raise ValueError(f"dispatch experts must hold integer ids, got {experts.dtype}")
    if not weights.is_floating_point():
        raise ValueError(f"dispatch weights must be floating point, got {weights.dtype}")
    tensors = {"w_in": bank.w_in, "w_out": bank.w_out, "b_in": bank.b_in, "b_out": bank.b_out}
    dtype = bank.w_in.dtype
    for name, t in tensors.items():
        if t is not None and t.dtype != dtype:
            raise ValueError(
                f"expert {name} is {t.dtype} but w_in is {dtype}; give every expert tensor "
                "one dtype (bank.to(dtype))"
            )
    if x.dtype != dtype and not torch.is_autocast_enabled(x.device.type):
        raise ValueError(
            f"dispatch input x is {x.dtype} but the expert weights are {dtype}; cast one to "
            f"the other (x.to({dtype}) or the module's .to({x.dtype})), or run under "
            "torch.autocast"
        )


def _check_ids(experts: Tensor, num_experts: int) -> None:
    if experts.numel() == 0 or torch.compiler.is_compiling():
        return
    message = (
        f"dispatch experts holds an id outside the valid ids: valid ids are "
        f"0..{num_experts - 1} and {EMPTY} for an empty slot"
    )
    if experts.device.type == "cpu":
        if experts.numel() <= HOST_CHECK_SLOTS:  # a list's min and max cost less than aminmax
            ids = experts.reshape(-1).tolist()
            low, high = min(ids), max(ids)
        else:
            low, high = (int(v) for v in torch.aminmax(experts))
        if low < EMPTY or high >= num_experts:
            raise ValueError(f"{message}; got ids from {low} to {high}")
        return
    ok = ((experts >= EMPTY) & (experts < num_experts)).all()
    torch._assert_async(ok, message)
