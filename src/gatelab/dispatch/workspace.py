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
saved it is freed. The experts' weight gradients come from a third pool
(``gradient_buffer``): a gradient outlives the backward (autograd makes it the parameter's
``.grad``), so its buffer is reused only once nothing else holds its memory, typically
after the optimizer's ``zero_grad()``. ``release_workspace()`` frees the calling thread's
scratch and the idle pools.

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
import weakref

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
    with _GRADIENTS_LOCK:
        for buffers in list(_GRADIENTS.values()):
            buffers[:] = [b for b in buffers if _held_elsewhere(b)]


class _Lease:
    """Gives a pooled buffer back when the autograd node that saved it is freed."""

    __slots__ = ("buffer",)

    def __init__(self, buffer: Tensor):
        self.buffer = buffer

    def __del__(self):
        with _POOL_LOCK:
            _POOL.setdefault(self.buffer.dtype, []).append(self.buffer)


_POOL: dict[torch.dtype, list[Tensor]] = {}
# Re-entrant: a _Lease's __del__ can run inside an allocation made under the lock (the
# cyclic garbage collector), in the same thread.
_POOL_LOCK = threading.RLock()


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


# The buffers of each weight's gradients, by id of the weight: dropped with the weight.
_GRADIENTS: dict[int, list[Tensor]] = {}
_GRADIENTS_LOCK = threading.Lock()


def _storage_users(t: Tensor) -> int | None:
    """How many references hold ``t``'s memory (None where torch has no such count)."""
    use_count = getattr(torch._C, "_storage_Use_Count", None)
    return None if use_count is None else use_count(t.untyped_storage()._cdata)


# What the count reads for a tensor that alone holds its memory (1, plus the temporary
# storage object the count itself takes).
_SOLE = _storage_users(torch.empty(1))


def _held_elsewhere(buffer: Tensor) -> bool:
    return _storage_users(buffer) != _SOLE


def gradient_buffer(weight: Tensor, shape: tuple[int, ...] | None = None) -> Tensor:
    """An uninitialised tensor for ``weight``'s gradient (of ``shape``, default the
    weight's), which autograd will keep as its ``.grad``.

    A fresh CPU tensor above glibc's mmap threshold (32 MB at most) is new pages from the
    OS on every step, and their first touch can cost more than the GEMMs that write them:
    filling a fresh [128, 128, 512] float32 tensor took 12.0-14.4 ms, a reused one 0.5 ms
    (fine-128's w_in gradient; docs/benchmarks.md, "CPU strategies"). So each weight keeps
    its gradients' buffers, handed out again once nothing else holds their memory: the
    ``.grad`` was dropped (``zero_grad()``) or the new gradient was summed into a kept
    ``.grad``. The handed-out tensor is a fresh view, which autograd's AccumulateGrad
    takes as the ``.grad`` without a copy, as it takes a new tensor. The buffers go when
    the weight does (or, while free, at :func:`release_workspace`).
    """
    shape = tuple(weight.shape) if shape is None else shape
    if weight.device.type != "cpu" or torch.compiler.is_compiling() or _SOLE is None:
        return torch.empty(shape, dtype=weight.dtype, device=weight.device)
    numel, key = math.prod(shape), id(weight)
    with _GRADIENTS_LOCK:
        buffers = _GRADIENTS.get(key)
        if buffers is None:
            buffers = _GRADIENTS[key] = []
            # The callback runs when the weight is freed: no lock (it may run inside
            # any allocation, this function's included), a dict pop is atomic.
            weakref.finalize(weight, _GRADIENTS.pop, key, None)
        fits, others = [], []
        for b in buffers:
            (fits if b.numel() == numel and b.dtype == weight.dtype else others).append(b)
        # Buffers of another size or dtype (the weight was cast since) go once free.
        buffers[:] = fits + [b for b in others if _held_elsewhere(b)]
        buffer = next((b for b in fits if not _held_elsewhere(b)), None)
        if buffer is None:
            buffer = torch.empty(numel, dtype=weight.dtype)
            buffers.append(buffer)
        return buffer.view(shape)
