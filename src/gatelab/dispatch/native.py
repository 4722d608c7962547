"""The dispatcher's C++ parts, built on first use: split's expert loop, a small
inference call's forward and the slots' sort (``split_experts.cpp``), and the few-row
expert products (``few_rows.cpp``); also split's GEMMs alone, which ``gatelab bench moe``
times as a bound (``gemms_only``).

Split runs each expert's whole pass on one single-threaded worker. From Python every
expert costs ~25 small torch calls, and the workers' Python runs one at a time under
the GIL: with many small experts that is most of the pass (docs/benchmarks.md, "CPU
strategies"). ``split_experts.cpp`` runs the same ops on the same views in C++, one
call per pass, its workers torch's own OpenMP threads (one parallel region of torch's
libgomp, as ``cpu_threads.openmp_team`` opens from Python), so the results keep their
bits (tested against the Python loop) and the GIL is held by no one.

An expert of at most :data:`ROWS_MAX` rows (decode) is a pass over its weights, and
MKL's GEMM reads them at a fraction of the memory's bandwidth there. ``few_rows.cpp``
reads each weight row once, dots it with every input row, and shares the rows of all
such experts between torch's threads in one parallel region (:func:`rows_linear`). The
phase-wise loop, both split loops and the C++ split all use it for those experts, so
the strategies' outputs keep their bits; its float64 results are tested against a matmul.
A small inference call (a decode step) runs whole in one C++ call (:func:`small_forward`):
at one token the Python around the two projections cost as much as they did. The slots'
sort by expert is one counting sort on the host (:func:`sort_slots`), where torch took a
dozen ops around a stable argsort.

The sources are compiled with ``torch.utils.cpp_extension.load`` the first time a CPU
call needs them in a process (about 15 s on 2 cores; torch caches the build under
``~/.cache/torch_extensions`` and reuses it until the source or torch changes). Where
there is no C++ compiler, or ``GATELAB_NATIVE=0`` is set, or the build fails, split
keeps its Python loop and few-row experts MKL's GEMMs; the reason is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

from ..experts.activation import GLU, Plain
from .switch import ThreadSwitch

_SOURCES = [str(Path(__file__).with_name(name)) for name in ("split_experts.cpp", "few_rows.cpp")]
_NAME = "gatelab_split_experts"
# The kernels of experts/activation.py that the C++ loop has, by its index.
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
ROWS_MAX = 6
"""Experts of 1 to this many rows take ``few_rows.cpp``. Against MKL's best form of each
row count (note 3 of ``benchmarks/cpu_notes.py``, [2048, 512] and [512, 1024] weights, 2
threads) it took 0.43-0.65x the time at 1-6 rows with the weight in cache and about
0.5-1.0x streamed from memory (one row: 0.8-1.0x the bmm over row blocks in three
repeats); at 8 rows 0.6-0.8x in cache and 0.8-1.0x from memory, at 12 rows 0.9x to
1.3x: past 6 rows the gain is within this machine's noise, so MKL keeps those."""
_ROWS_DTYPES = (torch.float32, torch.float64)

_log = logging.getLogger(__name__)
_BUILD_LOCK = threading.Lock()  # one build per process, whichever thread gets there first


PARTS = ("split", "rows", "small", "sort")
"""The C++ parts: split's loop, the few-row kernel, the small-call forward and the
slots' counting sort."""
_SWITCHES = {part: ThreadSwitch() for part in PARTS}


@contextlib.contextmanager
def disabled(*parts: str) -> Iterator[None]:
    """Run the Python (and MKL) path instead of the named C++ parts, all of them when
    none are named, in this thread (benchmarks, tests)."""
    unknown = set(parts) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown native parts {sorted(unknown)}; valid: {', '.join(PARTS)}")
    with contextlib.ExitStack() as stack:
        for part in parts or PARTS:
            stack.enter_context(_SWITCHES[part].off())
        yield


def enabled(part: str) -> bool:
    """Whether ``part`` is on in this thread and the build is loaded (building it on
    first call)."""
    return _SWITCHES[part].on and _load()


def available() -> bool:
    """Whether split's C++ loop is on and built here."""
    return enabled("split")


def _load() -> bool:
    with _BUILD_LOCK:
        return _build()


@functools.cache
def _build() -> bool:
    if os.environ.get("GATELAB_NATIVE", "1") == "0":
        return False
    from torch.utils.cpp_extension import load

    _log.info("gatelab: building the C++ expert loop (once; torch caches the build)")
    try:
        load(
            name=_NAME,
            sources=_SOURCES,
            # The workers are an omp parallel region; libgomp.so.1 resolves to the copy
            # torch has loaded (its soname), so they are torch's own team. fp-contract
            # lets the few-row dot products use FMA where the CPU has it.
            extra_cflags=["-O3", "-fopenmp", "-ffp-contract=fast"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: keep Python
        _log.warning(
            "gatelab: split keeps its Python loop and few-row experts MKL's GEMMs; "
            "the C++ build failed: %s",
            error,
        )
        return False
    return True


def activation_index(activation) -> tuple[int, bool] | None:
    """(kernel index, glu) of an activation the C++ loop runs, else None."""
    if type(activation) not in (Plain, GLU) or activation.name not in ACTIVATIONS:
        return None
    return ACTIVATIONS[activation.name], isinstance(activation, GLU)


def forward(*args) -> None:
    """``gatelab_split::forward``: see ``split_experts.cpp`` for the arguments."""
    torch.ops.gatelab_split.forward(*args)


def backward(*args) -> None:
    """``gatelab_split::backward``: see ``split_experts.cpp`` for the arguments."""
    torch.ops.gatelab_split.backward(*args)


def gemms_only(*args) -> None:
    """``gatelab_split::gemms_only``: split's GEMMs alone (``gatelab bench moe``'s bound);
    see ``split_experts.cpp`` for the arguments."""
    torch.ops.gatelab_split.gemms_only(*args)


def rows_fit(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`rows_linear` takes x [N, in], w [E, out, in] and out [N, out]
    (building it on first call): CPU, float32 or float64, unit-stride rows, a contiguous
    w, nothing autograd would record (the op has no backward)."""
    tensors = (x, w, out)
    recorded = torch.is_grad_enabled() and any(t.requires_grad for t in tensors)
    return (
        not recorded
        and w.dtype in _ROWS_DTYPES
        and all(t.device.type == "cpu" and t.dtype == w.dtype for t in tensors)
        and w.is_contiguous()
        and x.stride(1) == 1
        and out.stride(1) == 1
        and enabled("rows")
    )


def rows_linear(x, w, experts, starts, counts, out, workers: int) -> None:
    """``out[s:s+c] = x[s:s+c] @ w[e].T`` for each listed expert ``e``, start ``s`` and
    count ``c`` (Python lists), on up to ``workers`` of torch's threads; see
    ``few_rows.cpp``. Check :func:`rows_fit` first."""
    torch.ops.gatelab_rows.linear(x, w, experts, starts, counts, out, workers)


def small_fits(x: torch.Tensor, bank) -> bool:
    """Whether :func:`small_forward` takes x and the expert bank (for an inference call:
    the op has no backward): CPU, x in the weights' dtype, float32 or float64, contiguous
    weights, and both the few-row kernel and this part on."""
    w_in, w_out = bank.w_in, bank.w_out
    return (
        w_in.dtype in _ROWS_DTYPES
        and all(t.device.type == "cpu" and t.dtype == w_in.dtype for t in (x, w_in, w_out))
        and w_in.is_contiguous()
        and w_out.is_contiguous()
        and enabled("rows")
        and enabled("small")
    )


def small_forward(x, experts, weights, bank, kernel: tuple[int, bool]) -> torch.Tensor:
    """``gatelab_split::small_forward``: a small inference call whole, phase-wise (see
    ``split_experts.cpp``); ``kernel`` is :func:`activation_index`'s."""
    return torch.ops.gatelab_split.small_forward(
        x, experts, weights, bank.w_in, bank.w_out, bank.b_in, bank.b_out, *kernel,
        ROWS_MAX, torch.get_num_threads(),
    )  # fmt: skip


def sort_fits(experts: torch.Tensor) -> bool:
    """Whether :func:`sort_slots` takes ``experts`` (building it on first call): [T, K]
    int64 on CPU, and this part on."""
    return (
        experts.device.type == "cpu"
        and experts.dim() == 2
        and experts.dtype == torch.int64
        and enabled("sort")
    )


def sort_slots(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """``gatelab_split::sort_slots``: ``grouped.sort_slots``'s six tensors from a stable
    counting sort on the host, a counting pass and a placing pass over the slots (check
    :func:`sort_fits` first)."""
    return tuple(torch.ops.gatelab_split.sort_slots(experts, num_experts))
