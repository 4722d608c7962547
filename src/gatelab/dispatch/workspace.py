"""Reusable scratch buffers for the CPU dispatch path.

On CPU, PyTorch takes every large tensor fresh from the OS, and the first touch of its
pages costs more than the work done in them: a GEMM into a new 64 MB output ran 15%
slower than into a reused one (docs/benchmarks.md). The grouped dispatcher's temporaries
(gathered rows, activations, gradients that never leave the call) therefore live in
per-thread buffers that grow to the largest size seen and are reused. CUDA's caching
allocator already does this, so on other devices, and under ``torch.compile``, ``scratch``
is a plain ``torch.empty``. ``release_workspace()`` frees the buffers of the calling thread.
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
    """Free the calling thread's scratch buffers (they are made again when needed)."""
    _WORKSPACE.buffers.clear()
