"""torch's grouped GEMM where it runs, and ``gatelab::grouped_mm``: the same product as one
opaque custom op, the form ``torch.compile`` traces.

Traced directly, ``torch._grouped_mm`` refuses on this torch what the eager kernel takes
(its fake kernel accepts bf16 only, while the CPU and CUDA kernels also run float32), and
its address-based alignment check (``data_ptr()``) breaks the graph. The custom op's fake
kernel states the output shape from the input shapes alone, so a compiled graph holds one
node per projection with a fixed shape, and the real kernel picks torch's grouped GEMM or
a loop of matmuls on the real tensors, outside the graph's tracing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> bool:
    """The kernel's layout rule: 16-byte aligned data, one unit stride among the last two
    dims and every other stride a multiple of 16 bytes."""
    size = t.element_size()
    *batch, row, col = t.stride()
    inner = (col == 1 and row * size % 16 == 0) or (row == 1 and col * size % 16 == 0)
    return t.data_ptr() % 16 == 0 and inner and all(s * size % 16 == 0 for s in batch)


def grouped_mm_supported(a: Tensor, b: Tensor) -> bool:
    """Whether torch's grouped GEMM kernel takes operands ``a`` and ``b`` as they are."""
    if _GROUPED_MM is None or a.dtype not in _GROUPED_DTYPES or b.dtype != a.dtype:
        return False
    if a.device.type == "cuda" and torch.cuda.get_device_capability(a.device) < (8, 0):
        return False
    if a.device.type == "cpu" and not hasattr(F, "grouped_mm"):
        return False  # torch._grouped_mm of torch <= 2.9 has no CPU kernel
    if a.device.type not in ("cpu", "cuda"):
        return False
    return _aligned(a) and _aligned(b)


@torch.library.custom_op("gatelab::grouped_mm", mutates_args=())
def grouped_mm_op(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    """``a [N, in] @ b[e] [in, out]`` per expert's rows (b 3-D) -> [N, out], or
    ``a[:, rows_e] @ b[rows_e]`` per expert (both 2-D) -> [E, a.rows, b.cols]; ``offsets``
    are the int32 end offsets of the experts' rows. Rows past ``offsets[-1]`` are padding:
    their output rows are unspecified (zero here), and they add nothing to a 2-D product."""
    if grouped_mm_supported(a, b):
        return _GROUPED_MM(a, b, offs=offsets)
    return _loop_mm(a, b, offsets)


def _loop_mm(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    # float64, odd widths, old torch: reads the offsets on the host (a synchronisation on
    # an accelerator, which only these dtypes and layouts pay).
    ends = offsets.tolist()
    starts = [0, *ends[:-1]]
    if b.dim() == 3:
        out = a.new_zeros(a.shape[0], b.shape[2])
        for e, (start, end) in enumerate(zip(starts, ends, strict=True)):
            torch.mm(a[start:end], b[e], out=out[start:end])
        return out
    out = a.new_empty(len(ends), a.shape[0], b.shape[1])
    for e, (start, end) in enumerate(zip(starts, ends, strict=True)):
        torch.mm(a[:, start:end], b[start:end], out=out[e])
    return out


@grouped_mm_op.register_fake
def _(a: Tensor, b: Tensor, offsets: Tensor) -> Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[2])
    return a.new_empty(offsets.shape[0], a.shape[0], b.shape[1])
