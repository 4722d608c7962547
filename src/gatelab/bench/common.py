"""Helpers every benchmark shares: the device, a timer, a copy-bandwidth probe, the environment.

Timing rules (DESIGN.md): everything compared runs in one process, each number is the
median of ``repeats`` timed calls after ``warmup`` untimed ones, the clock is
``time.perf_counter``, and on CUDA the device is synchronised before the clock starts and
before it stops, so the time covers the kernels and not only their launch.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
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
    number: int = 1,
) -> list[float]:
    """Seconds per call of ``fn`` in each of ``repeats`` samples of ``number`` back-to-back
    calls, after ``warmup`` untimed calls.

    ``setup`` runs before every sample (and warm-up call) outside the clock: resetting
    gradients, say. ``sync`` waits for the device; it runs before the clock starts and
    before it stops.
    """
    if repeats < 1 or warmup < 0 or number < 1:
        raise ValueError(
            f"need repeats >= 1, warmup >= 0 and number >= 1, got {repeats}, {warmup} and {number}"
        )
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
        for _ in range(number):
            fn()
        if sync is not None:
            sync()
        times.append((time.perf_counter() - start) / number)
    return times


MIN_SAMPLE_S = 0.02
"""A timed sample of a call shorter than this repeats it back to back until the sample
lasts about this long (:func:`calls_per_sample`): one sub-millisecond call, timed alone
right after other variants, mostly measures waking the intra-op threads and the timer."""


def calls_per_sample(fn: Callable[[], object], sync: Callable[[], None] | None = None) -> int:
    """How many back-to-back calls of ``fn`` last about ``MIN_SAMPLE_S`` (1 to 1000), from
    one warm and one timed call."""
    fn()
    seconds = timeit(fn, 0, 1, sync=sync)[0]
    return max(1, min(1000, math.ceil(MIN_SAMPLE_S / max(seconds, 1e-9))))


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


# -- contention -----------------------------------------------------------------------------

BUSY_LOOP = """\
import os, sys
parent = int(sys.argv[1])
print("ready", flush=True)
x = 1
while os.getppid() == parent:  # the bench is gone (killed): stop spinning
    for _ in range(200_000):
        x = (x * 1103515245 + 12345) % 2147483648
"""
"""What each busy process runs: integer arithmetic in pure Python (one thread, no torch,
no memory traffic to speak of), checking about every few ms that its parent is alive."""

CONTENTION_METHOD = (
    "busy processes: separate Python processes (subprocess, `python -c` integer-arithmetic "
    "spin loop, one thread each, the bench's own niceness), started before timing and "
    "stopped after"
)

BUSY_STOP_TIMEOUT_S = 5.0


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[list[int]]:
    """Run ``count`` busy processes while the ``with`` block runs; yields their pids.

    Each is a separate OS process spinning on pure-Python integer arithmetic (one thread),
    at the same niceness as this one, so it competes for a core on equal terms: the load a
    second program on a shared machine puts on a benchmark. The block starts only once
    every process has started spinning. On the way out, also on an exception or Ctrl-C,
    each is terminated, waited for (``BUSY_STOP_TIMEOUT_S``) and killed if it is still
    there; a busy process also stops by itself once this process is gone.
    ``count == 0`` runs nothing.
    """
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise ValueError(f"busy process count must be an integer >= 0, got {count!r}")
    procs: list[subprocess.Popen] = []
    try:
        for _ in range(count):
            proc = subprocess.Popen(
                [sys.executable, "-c", BUSY_LOOP, str(os.getpid())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            procs.append(proc)
        for proc in procs:
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError(
                    f"busy process {proc.pid} did not start (exit status {proc.poll()})"
                )
            proc.stdout.close()
        yield [proc.pid for proc in procs]
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen]) -> None:
    """Terminate, wait for, and if need be kill each process."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=BUSY_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None and not proc.stdout.closed:
            proc.stdout.close()


def contention_record(count: int) -> dict:
    """How the run was loaded, for the JSON."""
    return {"processes": count, "method": CONTENTION_METHOD if count else None}


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
