"""Every expert's GEMM of one projection in one call: MKL's ``cblas_?gemm_batch``.

On CPU the grouped dispatcher's projections are E independent GEMMs, one per expert, of
different row counts. Run as a Python loop of ``torch.mm`` each GEMM uses both intra-op
threads and ends in a barrier between them: with many small experts that is hundreds of
barriers per pass and a Python call per expert, and beside a busy process each barrier
waits for a descheduled thread. MKL's batched GEMM takes the whole group list in one
call and spreads the experts over its threads itself. Measured on the 2-core machine
(benchmarks/cpu_notes.py, note 6: the six forward and backward GEMMs of issue 17's
training shapes, dense time / experts' time, torch.mm loop -> one batched call per GEMM):

    beside a busy process   0.58-0.80 -> 0.71-1.03 (fine 0.58 -> 1.03, mid-32 0.73 -> 1.01)
    idle                    0.78-0.96 -> 0.78-0.93 (top1-16 0.94 -> 0.81, coarse 0.96 -> 0.88)

On whole layers (note 5, fwd+bwd vs dense) phases with batched GEMMs reads 0.84 against
0.62 at mid-32 and 0.71 against 0.57 at fine-128 beside a busy process, but 0.70 against
0.77 at fine-short; idle the two are within -0.07..+0.05 of each other. It matters where
phases runs under load: the rule cannot split (a hot expert, too few experts) or cannot
see the load (no /proc/stat). The batched call gives the bits of the loop where it runs (tested;
see :data:`MIN_ROWS` and :data:`WIDTH_MULTIPLE` for where it does not), so which path
ran never changes a result.

The function is looked up in torch's own library (``libtorch_cpu``, into which torch's
wheels link MKL, and which exports it; torch's own CPU ``bmm`` calls it), with ctypes;
ctypes releases the GIL for the call. Torch links MKL's LP64 interface (32-bit integers,
as ATen's own ``mkl_gemm_batched`` declares them); a tiny product checked against
``torch.mm`` on first use guards the binding. Where torch has no MKL (macOS, ARM
builds) or the check fails, :func:`available` is False and the callers loop.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from .switch import ThreadSwitch

_SYMBOLS = {torch.float32: "cblas_sgemm_batch", torch.float64: "cblas_dgemm_batch"}
_ROW_MAJOR, _NO_TRANS, _TRANS = 101, 111, 112  # CBLAS_LAYOUT and CBLAS_TRANSPOSE values
_INT_MAX = 2**31 - 1  # LP64: every size, leading dimension and count is a C int
_LIBRARY_NAMES = ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll")

# Products whose output has fewer rows than this stay with the caller's torch.mm loop:
# with several groups on two threads, MKL 2024.2's batched call rounds groups of 5 to 11
# output rows (but 8) differently from its GEMM (measured on the 2-core AVX-512 machine;
# 2 to 4 and from 12 on, the bits are the GEMM's). The loop runs its few-row forms there
# anyway. tests/test_gemm_batch.py checks the bits on random group lists.
MIN_ROWS = 12
# Both widths of every product (in and out features) must be multiples of this: with odd
# widths (29, 31) the batched weight gradients of mixed group lists came out with other
# bits than the loop's, never with widths that are multiples of 8 (tests/test_gemm_batch.py).
# Model widths are multiples of 64 in practice; odd test widths take the loop.
WIDTH_MULTIPLE = 8


_SWITCH = ThreadSwitch()
disabled = _SWITCH.off
"""Loop over experts with ``torch.mm`` instead, in this thread (benchmarks, tests)."""


def available(dtype: torch.dtype) -> bool:
    """Whether the batched call runs for ``dtype`` here (and is not :func:`disabled`)."""
    return _SWITCH.on and _function(dtype) is not None


@functools.cache
def _library() -> ctypes.CDLL | None:
    if not torch.backends.mkl.is_available():
        return None
    lib_dir = Path(torch.__file__).parent / "lib"
    for name in _LIBRARY_NAMES:
        if (lib_dir / name).exists():
            try:
                return ctypes.CDLL(str(lib_dir / name))  # already loaded: the same handle
            except OSError:
                return None
    return None


@functools.cache
def _function(dtype: torch.dtype):
    library = _library()
    symbol = _SYMBOLS.get(dtype)
    fn = getattr(library, symbol, None) if library is not None and symbol else None
    if fn is None:
        return None
    pointer = ctypes.c_void_p
    fn.restype = None
    # layout, transa[], transb[], m[], n[], k[], alpha[], a[], lda[], b[], ldb[], beta[],
    # c[], ldc[], group_count, group_size[]
    fn.argtypes = [ctypes.c_int, *[pointer] * 13, ctypes.c_int, pointer]
    return fn if _binding_works(fn, dtype) else None


def _binding_works(fn, dtype: torch.dtype) -> bool:
    """Two small products of different shapes through ``fn`` equal ``torch.mm``'s."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=generator, dtype=dtype)
    w = torch.randn(2, 3, 5, generator=generator, dtype=dtype)
    out = torch.full((7, 3), float("nan"), dtype=dtype)
    counts = torch.tensor([3, 4])
    _call(fn, _linear_groups(x, w, counts, counts.cumsum(0) - counts, out, torch.arange(2)))
    expected = torch.cat([x[:3] @ w[0].t(), x[3:] @ w[1].t()])
    return torch.allclose(out, expected)


def linear(x: Tensor, w: Tensor, counts: Tensor, out: Tensor) -> bool:
    """out[rows of e] = x[rows of e] @ w[e].T for every expert with at least
    :data:`MIN_ROWS` rows (the caller does the others), rows sorted by expert
    (``counts`` [E]); x [N, in], w [E, out, in], out [N, out].

    Returns False, having written nothing, where the call cannot take these tensors
    (device, dtype, layout, sizes past 32 bits, widths not multiples of
    :data:`WIDTH_MULTIPLE`, or :func:`available` is False).
    """
    if not (_widths(w) and _takes(x, w, out) and _row_major(x) and _row_major(out)):
        return False
    if _weight_layout(w) is None:
        return False
    _call_for_large_experts(_linear_groups, x, w, counts, out)
    return True


def weight_grad(grad: Tensor, inp: Tensor, counts: Tensor, out: Tensor) -> bool:
    """out[e] = grad[rows of e].T @ inp[rows of e] for every expert with at least
    :data:`MIN_ROWS` rows (the caller does the others); grad [N, out], inp [N, in],
    out [E, out, in] contiguous.

    Returns False, having written nothing, where the call cannot take these tensors
    (as :func:`linear`) or where out has fewer than :data:`MIN_ROWS` rows.
    """
    if out.shape[1] < MIN_ROWS or not (_widths(out) and _takes(grad, inp, out)):
        return False
    if not (out.is_contiguous() and _row_major(grad) and _row_major(inp)):
        return False
    _call_for_large_experts(_weight_grad_groups, grad, inp, counts, out)
    return True


def _call_for_large_experts(groups_of, a: Tensor, b: Tensor, counts: Tensor, out: Tensor):
    """One batched call over the experts of at least MIN_ROWS rows, its arguments built
    by ``groups_of(a, b, counts, starts, out, chosen)``."""
    counts = counts.to(torch.int64)
    chosen = (counts >= MIN_ROWS).nonzero().squeeze(1)
    if chosen.numel():
        starts = counts.cumsum(0) - counts
        _call(_function(a.dtype), groups_of(a, b, counts, starts, out, chosen))


def _takes(*tensors: Tensor) -> bool:
    """CPU tensors of one dtype the call runs for, every size and stride a C int, and
    nothing autograd would record (the call writes behind its back, as ``out=`` does)."""
    first = tensors[0]
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        not recorded
        and available(first.dtype)
        and all(t.device.type == "cpu" and t.dtype == first.dtype for t in tensors)
        and all(max(t.shape) <= _INT_MAX and max(t.stride()) <= _INT_MAX for t in tensors)
    )


def _widths(w: Tensor) -> bool:
    """Both widths of [E, out, in] are positive multiples of WIDTH_MULTIPLE."""
    return all(width > 0 and width % WIDTH_MULTIPLE == 0 for width in w.shape[1:])


def _row_major(t: Tensor) -> bool:
    """[rows, cols] with unit column stride and a row stride MKL accepts (>= cols)."""
    return t.stride(1) == 1 and t.stride(0) >= max(t.shape[1], 1)


def _weight_layout(w: Tensor) -> tuple[int, int] | None:
    """(transb, ldb) that read each w[e] [out, in] as B = w[e].T, or None if MKL cannot."""
    out_dim, in_dim = w.shape[1:]
    if w.stride(2) == 1 and w.stride(1) >= max(in_dim, 1):  # row-major: read transposed
        return _TRANS, w.stride(1)
    if w.stride(1) == 1 and w.stride(2) >= max(out_dim, 1):  # its transpose is row-major
        return _NO_TRANS, w.stride(2)
    return None


def _linear_groups(x, w, counts, starts, out, chosen):
    """The per-group arguments of out[rows] = x[rows] @ w[e].T, one group per chosen e."""
    trans_b, ldb = _weight_layout(w)
    rows, first = counts[chosen], starts[chosen]
    size = x.element_size()
    return _Groups(
        dtype=x.dtype,
        trans=(_NO_TRANS, trans_b),
        mnk=(rows, w.shape[1], w.shape[2]),
        pointers=(
            x.data_ptr() + first * (x.stride(0) * size),
            w.data_ptr() + chosen * (w.stride(0) * size),
            out.data_ptr() + first * (out.stride(0) * size),
        ),
        leading=(x.stride(0), ldb, out.stride(0)),
    )


def _weight_grad_groups(grad, inp, counts, starts, out, chosen):
    """The per-group arguments of out[e] = grad[rows].T @ inp[rows], one per chosen e."""
    first = starts[chosen]
    size = grad.element_size()
    return _Groups(
        dtype=grad.dtype,
        trans=(_TRANS, _NO_TRANS),
        mnk=(out.shape[1], out.shape[2], counts[chosen]),
        pointers=(
            grad.data_ptr() + first * (grad.stride(0) * size),
            inp.data_ptr() + first * (inp.stride(0) * size),
            out.data_ptr() + chosen * (out.stride(0) * size),
        ),
        leading=(grad.stride(0), inp.stride(0), out.stride(1)),
    )


class _Groups:
    """The argument arrays of one batched call, one group of one GEMM per expert.

    ``mnk`` and ``leading`` entries are ints (the same for every group) or [G] tensors;
    ``pointers`` are the [G] int64 addresses of each group's A, B and C.
    """

    def __init__(self, dtype, trans, mnk, pointers, leading):
        groups = pointers[0].shape[0]
        # One int32 block for the integer arrays, rows: transa, transb, m, n, k, lda,
        # ldb, ldc, group sizes (all 1).
        self.ints = torch.empty(9, groups, dtype=torch.int32)
        for row, value in enumerate((*trans, *mnk, *leading, 1)):
            self.ints[row] = value
        self.pointers = torch.stack(pointers)  # [3, G] int64
        self.scalars = torch.tensor([[1.0], [0.0]], dtype=dtype).expand(2, groups).contiguous()
        self.groups = groups


def _call(fn, groups: _Groups) -> None:
    ints, pointers, scalars = groups.ints, groups.pointers, groups.scalars
    row = [ints[i].data_ptr() for i in range(9)]
    fn(
        _ROW_MAJOR,
        row[0],  # transa
        row[1],  # transb
        row[2],  # m
        row[3],  # n
        row[4],  # k
        scalars[0].data_ptr(),  # alpha = 1
        pointers[0].data_ptr(),
        row[5],  # lda
        pointers[1].data_ptr(),
        row[6],  # ldb
        scalars[1].data_ptr(),  # beta = 0
        pointers[2].data_ptr(),
        row[7],  # ldc
        groups.groups,
        row[8],  # group sizes
    )
