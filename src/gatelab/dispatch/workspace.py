"""Reusable scratch buffers for the CPU dispatch path.

On CPU, PyTorch takes every large tensor fresh from the OS, and the first touch of its
pages is expensive: a GEMM into a new 64 MB output ran 17% slower than into a reused one
(benchmarks/cpu_notes.py). The grouped dispatcher's temporaries (gradients of activations,
outputs that are summed away) therefore live in per-thread buffers that grow to the
largest size seen and are reused. CUDA's caching
allocator already does this, so on other devices, and under ``torch.compile``, ``scratch``
is a plain ``torch.empty``.

What a layer saves for backward (gathered rows, pre-activation, activation) comes from a
pool instead (``saved_buffer``): a buffer returns to it only when the autograd node that
saved it is freed. ``release_workspace()`` frees the calling thread's scratch and the idle pool.

Both hand out uninitialised memory (as ``torch.empty`` does on CUDA), so no output may
depend on a row nobody wrote: every dispatcher entry checks the expert ids (``checks.py``)
and ``grouped.sort_slots`` routes only ids in 0..E-1 to the first ``counts.sum()`` rows,
which the GEMMs write. The rows after them (empty slots: ``sort_slots`` keeps all T*K
so that shapes never depend on the data) may hold anything; their outputs go to a row
the combine drops and their routing-weight gradients are masked to zero.
"""

from __future__ import annotations

import math
import threading

import torch
from torch import Tensor


class _Workspace(threading.local):
    def __init__(self):
        self.buffers: dict[tuple, Tensor] = {}


_WORKSPACE = _Workspace()


def scratch(name: str, shape: tuple[int, ...], like: Tensor) -> Tensor:
    """An uninitialised tensor of ``shape`` with ``like``'s dtype and device.

    Two live temporaries must use two names; a name's previous contents are overwritten.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=like.dtype, device=like.device)
    key = (name, like.dtype)
    numel = math.prod(shape)
    buffer = _WORKSPACE.buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = torch.empty(numel, dtype=like.dtype)
        _WORKSPACE.buffers[key] = buffer
    return buffer[:numel].view(shape)


def release_workspace() -> None:
    """Free the calling thread's scratch buffers and the pooled saved buffers not in use."""
    _WORKSPACE.buffers.clear()
    with _POOL_LOCK:
        _POOL.clear()


class _Lease:
    """Gives a pooled buffer back when the autograd node that saved it is freed."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: Tensor):
        self.buffer = buffer

    def __del__(self):
        with _POOL_LOCK:
            _POOL.setdefault(self.buffer.dtype, []).append(self.buffer)


_POOL: dict[torch.dtype, list[Tensor]] = {}
_POOL_LOCK = threading.Lock()


def saved_buffer(shape: tuple[int, ...], like: Tensor) -> tuple[Tensor, _Lease | None]:
    """An uninitialised tensor to save for backward, and the lease that returns it.

    Keep the lease on the autograd ctx: the buffer goes back to the pool only when the
    ctx is freed (after backward, or when the graph is dropped; never while
    ``retain_graph`` keeps it), so it is reused across steps instead of faulted in anew.
    """
    if like.device.type != "cpu" or torch.compiler.is_compiling():
        return torch.empty(shape, dtype=like.dtype, device=like.device), None
    numel = math.prod(shape)
    with _POOL_LOCK:
        free = _POOL.get(like.dtype, [])
        fits = [i for i, b in enumerate(free) if b.numel() >= numel]
        buffer = free.pop(min(fits, key=lambda i: free[i].numel())) if fits else None
    if buffer is None:
        buffer = torch.empty(numel, dtype=like.dtype)
    return buffer[:numel].view(shape), _Lease(buffer)
