"""The split strategy's expert loop in C++ (``split_experts.cpp``), built on first use.

Split runs each expert's whole pass on one single-threaded worker. From Python every
expert costs ~25 small torch calls, and the workers' Python runs one at a time under
the GIL: with many small experts that is most of the pass (docs/benchmarks.md, "CPU
strategies"). ``split_experts.cpp`` runs the same ops on the same views in C++, one
call per pass, its workers torch's own OpenMP threads (one parallel region of torch's
libgomp, as ``cpu_threads.openmp_team`` opens from Python), so the results keep their
bits (tested against the Python loop) and the GIL is held by no one.

The source is compiled with ``torch.utils.cpp_extension.load`` the first time split runs
in a process (about 10 s on 2 cores; torch caches the build under
``~/.cache/torch_extensions`` and reuses it until the source or torch changes). Where
there is no C++ compiler, or ``GATELAB_NATIVE=0`` is set, or the build fails, split
keeps its Python loop; the reason is logged once.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from pathlib import Path

import torch

from ..experts.activation import GLU, Plain
from .switch import ThreadSwitch

_SOURCE = Path(__file__).with_name("split_experts.cpp")
_NAME = "gatelab_split_experts"
# The kernels of experts/activation.py that the C++ loop has, by its index.
ACTIVATIONS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}

_log = logging.getLogger(__name__)
_BUILD_LOCK = threading.Lock()  # one build per process, whichever thread gets there first


_SWITCH = ThreadSwitch()
disabled = _SWITCH.off
"""Run split's Python loop instead, in this thread (benchmarks, tests)."""


def available() -> bool:
    """Whether the C++ loop is built and loaded here (building it on first call)."""
    return _SWITCH.on and _load()


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
            sources=[str(_SOURCE)],
            # The workers are an omp parallel region; libgomp.so.1 resolves to the copy
            # torch has loaded (its soname), so they are torch's own team.
            extra_cflags=["-O2", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except Exception as error:  # noqa: BLE001 - no compiler, no headers: keep Python
        _log.warning("gatelab: split keeps its Python loop; the C++ build failed: %s", error)
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
