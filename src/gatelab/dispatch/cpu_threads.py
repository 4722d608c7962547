"""Split experts between threads: the grouped dispatcher's second CPU strategy.

The grouped dispatcher runs each phase (gather, first GEMM, activation, second GEMM) over
all experts in turn, every op using torch's intra-op threads. With many small experts
that is many small two-thread ops, each ending in a barrier between the threads: on an
idle machine the barriers cost little, but when another process takes a core each
barrier waits for a descheduled thread (a scheduler time slice, milliseconds).

"split" runs the experts instead on a pool of workers, one per intra-op thread, each
doing the whole forward (or backward) of one expert after another with single-threaded
ops. Workers take the next expert from a shared queue, largest first, so a worker that
is descheduled simply takes fewer experts: one join per pass instead of one barrier per
op. Each expert's rows and weights are disjoint slices, so the result does not depend
on which worker ran which expert (the same bits as the phase-wise path when MKL's
single-threaded GEMM gives the bits of its multi-threaded one, and the same bits run to run).

:func:`cpu_strategy` chooses between the two at run time from the shape and, for small
experts, from whether other processes hold the cores (:func:`machine_busy`). The two give
the same bits (tested; it rests on MKL's one-thread GEMMs giving the bits of its
two-thread ones), so the load does not change a result. The measurements behind its
thresholds are in ``benchmarks/cpu_notes.py`` and docs/benchmarks.md ("CPU strategies").
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

STRATEGIES = ("phases", "split")

# "split" needs enough experts to keep every worker busy while the last ones finish: with
# fewer than this many active experts per worker the join waits on one worker's last expert.
SPLIT_MIN_EXPERTS_PER_WORKER = 2
# Split only experts with at least this much work (multiply-adds rows * D * F on average
# per active expert, ~0.7 ms of single-threaded GEMM per projection). Below it the hand-off
# costs more than the barriers it saves: it wakes two threads while the caller's OpenMP
# team still spins after its last parallel op (libgomp busy-waits for milliseconds after
# a parallel region), so one worker loses its core for a scheduler slice: 4-7 ms stalls
# in a 10 ms call of 16 experts of 256 x 256 x 128 (shape 4096,256,128,16,1: phases 6.8
# ms, split 10.3 ms idle), and at one token per call (decode) greedy generate() ran 25%
# slower. From 32M multiply-adds per expert (note 5's shapes from 4096,512,256,64,8 up)
# split is as fast as phases idle and faster beside a busy process.
SPLIT_MIN_WORK_PER_EXPERT = 32 * 2**20

_forced = threading.local()


@contextlib.contextmanager
def forced_strategy(name: str | None) -> Iterator[None]:
    """Make :func:`cpu_strategy` return ``name`` in this thread (None: choose by shape).

    For the benchmarks and tests that compare the strategies on one shape.
    """
    if name is not None and name not in STRATEGIES:
        raise ValueError(f"unknown CPU strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    previous = getattr(_forced, "name", None)
    _forced.name = name
    try:
        yield
    finally:
        _forced.name = previous


def cpu_strategy(
    counts: Sequence[int],
    dim: int,
    hidden_dim: int,
    threads: int | None = None,
    busy: bool | None = None,
) -> str:
    """Return "split" or "phases" for experts of width ``dim`` -> ``hidden_dim`` holding
    ``counts`` rows, from the shape and how busy the machine is.

    ``threads`` defaults to torch's intra-op thread count, ``busy`` to
    :func:`machine_busy`. Split needs at least two threads, at least
    ``SPLIT_MIN_EXPERTS_PER_WORKER`` active experts per thread and no expert holding more
    than one thread's share of the rows (a hot expert would run on one thread while the
    others wait; phase-wise, its GEMMs use every thread). It is then chosen when the
    experts hold ``SPLIT_MIN_WORK_PER_EXPERT`` multiply-adds each on average, or when
    other processes hold the cores torch's threads need.

    Measured on 2 cores (``benchmarks/cpu_notes.py`` note 5): above the work threshold
    the two strategies are within a few percent of each other idle, and split is faster
    beside a busy process (one join per pass instead of a barrier per op); below it
    phases wins idle, and split still wins beside a busy process (512,512,256,64,8:
    0.62 against 0.42 of dense speed).
    """
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    threads = torch.get_num_threads() if threads is None else threads
    active = sum(1 for c in counts if c)
    rows = sum(counts)
    if threads < 2 or active < SPLIT_MIN_EXPERTS_PER_WORKER * threads:
        return "phases"
    if max(counts) * threads > rows:
        return "phases"
    if rows * dim * hidden_dim >= SPLIT_MIN_WORK_PER_EXPERT * active:
        return "split"
    busy = machine_busy(threads) if busy is None else busy
    return "split" if busy else "phases"


# Other processes holding at least this much of the cores torch's threads need make the
# machine "busy" (one busy neighbour on 2 cores reads ~1.0; an idle machine 0.0-0.1).
BUSY_CORES = 0.5
# How often machine_busy re-reads the counters: it answers from the last window.
LOAD_WINDOW_S = 0.25


class _LoadSampler:
    """CPU time other processes used, per wall second, over the last window: all CPUs'
    busy time from /proc/stat (steal included: a neighbour VM stalls a barrier alike)
    minus this process's own CPU time. Linux only; elsewhere never busy."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pid = -1
        self.last: tuple[float, float, float] | None = None
        self.others = 0.0  # cores

    def other_cores(self) -> float:
        last = self.last  # the answer within a window needs no lock: ~1 us a call
        if last is not None and time.monotonic() - last[0] < LOAD_WINDOW_S:
            if self.pid == os.getpid():
                return self.others
        with self.lock:
            now = time.monotonic()
            if self.pid == os.getpid() and self.last and now - self.last[0] < LOAD_WINDOW_S:
                return self.others  # another thread sampled meanwhile
            system = _system_busy_s()
            if system is None:
                return 0.0
            sample = (now, system, time.process_time())
            if self.pid == os.getpid() and self.last is not None:
                wall = now - self.last[0]
                own = sample[2] - self.last[2]
                self.others = max(0.0, (sample[1] - self.last[1] - own) / wall)
            else:  # first call, or a forked child (its process time restarted)
                self.others, self.pid = 0.0, os.getpid()
            self.last = sample
            return self.others


def _system_busy_s() -> float | None:
    """Seconds all CPUs spent busy since boot, from /proc/stat; None where unreadable."""
    try:
        with open("/proc/stat", "rb") as stat:
            fields = stat.readline().split()
    except OSError:
        return None
    if len(fields) < 9 or fields[0] != b"cpu":
        return None
    # user nice system idle iowait irq softirq steal (guest time is inside user)
    ticks = [int(v) for v in fields[1:9]]
    busy = sum(ticks) - ticks[3] - ticks[4]
    return busy / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_CPUS = os.cpu_count() or 1  # what /proc/stat's first line sums over (os.cpu_count: ~7 us)
_LOAD = _LoadSampler()


def machine_busy(threads: int | None = None) -> bool:
    """Whether other processes hold cores that ``threads`` intra-op threads (default:
    torch's count) need: more than ``os.cpu_count() - threads + BUSY_CORES`` cores, read
    at most every ``LOAD_WINDOW_S``. The first call of a process answers False."""
    threads = torch.get_num_threads() if threads is None else threads
    return _LOAD.other_cores() > _CPUS - threads + BUSY_CORES


def _single_threaded() -> None:
    torch.set_num_threads(1)  # thread-local: OpenMP's and MKL's settings of this worker only


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    # Keyed by pid too: a forked child (a DataLoader worker) inherits the object but not
    # its threads.
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            pool = ThreadPoolExecutor(
                workers, thread_name_prefix="gatelab-experts", initializer=_single_threaded
            )
            _POOLS[key] = pool
    return pool


def run_split(
    work: Callable[[int, int, int], None], counts: Sequence[int], workers: int | None = None
) -> None:
    """Call ``work(expert, start, count)`` for every expert with rows, on ``workers``
    single-threaded workers (default: torch's intra-op thread count), largest first.

    ``start`` is the expert's first row in the expert-sorted rows. Returns when every call
    has finished; the first exception raised by a call is re-raised here.
    """
    workers = torch.get_num_threads() if workers is None else workers
    starts, start = [], 0
    for count in counts:
        starts.append(start)
        start += count
    tasks = sorted(((e, starts[e], c) for e, c in enumerate(counts) if c), key=lambda t: -t[2])
    queue = iter(tasks)  # next() on a list iterator is atomic under the GIL

    def drain() -> None:
        with torch.no_grad():  # grad mode is thread-local: workers compute raw values
            for task in queue:
                work(*task)

    futures = [_pool(workers).submit(drain) for _ in range(min(workers, len(tasks)))]
    for future in futures:
        future.result()
