"""Helpers every benchmark shares: the device, a timer, a copy-bandwidth probe, the environment.

Timing rules (DESIGN.md): everything compared runs in one process, each number is the
median of ``repeats`` timed calls after ``warmup`` untimed ones, the clock is
``time.perf_counter``, and on CUDA the device is synchronised before the clock starts and
before it stops, so the time covers the kernels and not only their launch.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone

import torch


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when available, else 'cpu'; a clear error for an unusable device."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda, but torch.cuda.is_available() is False (a CPU build of torch, "
            "or no visible GPU); use --device cpu or --device auto"
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {device!r}; valid: cpu, cuda, auto")
    return device


def device_sync(device: torch.device | str) -> Callable[[], None] | None:
    """A function that waits for queued kernels on ``device`` (None where calls are blocking)."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return None


def timeit(
    fn: Callable[[], object],
    warmup: int,
    repeats: int,
    setup: Callable[[], object] | None = None,
    sync: Callable[[], None] | None = None,
) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn``, after ``warmup`` untimed calls.

    ``setup`` runs before every call (warm-up and timed) outside the clock: resetting
    gradients, say. ``sync`` waits for the device; it runs before the clock starts and
    before it stops.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        if sync is not None:
            sync()
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return times


def median(times: list[float]) -> float:
    return statistics.median(times)


def copy_bandwidth(
    device: torch.device | str, nbytes: int, warmup: int = 1, repeats: int = 5
) -> dict:
    """Measured memory bandwidth of ``dst.copy_(src)`` on two ``nbytes`` buffers.

    A copy reads ``nbytes`` and writes ``nbytes``, so the bandwidth counted is
    ``2 * nbytes / time``: the rate at which the memory system moves bytes, which is what
    a weight-streaming kernel (reading weights once) is bounded by. Both buffers are
    written before timing so first-touch page faults are not measured.
    """
    sync = device_sync(device)
    numel = max(nbytes // 4, 1)
    src = torch.ones(numel, dtype=torch.float32, device=device)
    dst = torch.zeros_like(src)
    seconds = median(timeit(lambda: dst.copy_(src), warmup, repeats, sync=sync))
    moved = 2 * numel * 4
    return {
        "method": "dst.copy_(src) on float32 buffers; bandwidth = 2 * bytes / time "
        "(each byte is read once and written once)",
        "bytes": numel * 4,
        "seconds": seconds,
        "bytes_per_s": moved / seconds,
    }


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def environment(device: torch.device | str) -> dict:
    """Versions, hardware and threading: what a reader needs to compare two result files."""
    device = torch.device(device)
    from .. import __version__

    env = {
        "gatelab": __version__,
        "torch": torch.__version__,
        "transformers": package_version("transformers"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": device_name(device),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
    }
    env["load_average_1m"] = load_average()
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["device_capability"] = list(torch.cuda.get_device_capability(device))
    return env


def load_average() -> float | None:
    """The 1-minute load average: other processes on the machine skew CPU timings."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def __getattr__(name: str):
    """``write_json_atomic(data, path)``, the old spelling of ``gatelab.io.write_json``."""
    if name == "write_json_atomic":
        import warnings

        from ..io import write_json

        warnings.warn(
            "gatelab.bench.common.write_json_atomic(data, path) moved to "
            "gatelab.io.write_json(path, data)",
            DeprecationWarning,
            stacklevel=2,
        )
        return lambda data, path: write_json(path, data)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
