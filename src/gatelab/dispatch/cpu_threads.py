"""Split experts between threads: the grouped dispatcher's second CPU strategy.

The grouped dispatcher runs each phase (gather, first GEMM, activation, second GEMM) over
all experts in turn, every op using torch's intra-op threads. With many small experts
that is many small two-thread ops, each ending in a barrier between the threads: on an
idle machine the barriers cost little, but when another process takes a core each
barrier waits for a descheduled thread (a scheduler time slice, milliseconds), and MKL's
small GEMMs use two threads less well than two one-thread GEMMs side by side.

"split" runs the experts instead on one worker per intra-op thread, each doing the whole
forward (or backward) of one expert after another with single-threaded ops. Workers take
the next expert from a shared queue, largest first, so a worker that is descheduled
simply takes fewer experts: one join per pass instead of one barrier per op. Each
expert's rows and weights are disjoint slices, so the result does not depend on which
worker ran which expert (the same bits as the phase-wise path when MKL's single-threaded
GEMM gives the bits of its multi-threaded one, and the same bits run to run).

The workers are torch's own OpenMP threads where torch runs on OpenMP (its Linux wheels):
:func:`run_split` opens a parallel region of torch's OpenMP runtime (``GOMP_parallel``
through ctypes) whose threads run the Python work. Inside the region torch's ops and
MKL run single-threaded, as they do in any nested region; no thread count is changed
and no extra thread competes with the team, which keeps spinning for milliseconds after
each parallel op (libgomp's busy-wait) and used to take a core from separate workers.
On the team the whole pass runs in C++ where that builds (``native.py``), one call whose
workers are the same team's threads. Elsewhere the workers are a pool of single-threaded
Python threads, and split is kept to larger experts (:data:`SPLIT_MIN_WORK_PER_EXPERT`).

:func:`cpu_strategy` chooses between the two at run time from the shape and, for small
experts, from whether other processes hold the cores (:func:`machine_busy`). The two give
the same bits (tested; it rests on MKL's one-thread GEMMs giving the bits of its
two-thread ones), so the load does not change a result. The measurements behind its
thresholds are in ``benchmarks/cpu_notes.py`` and docs/benchmarks.md ("CPU strategies").
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

STRATEGIES = ("phases", "split")
RUNNERS = ("team", "pool")
"""Where split's workers run: torch's OpenMP team, or a pool of Python threads."""

# "split" needs enough experts to keep every worker busy while the last ones finish: with
# fewer than this many active experts per worker the join waits on one worker's last expert.
SPLIT_MIN_EXPERTS_PER_WORKER = 2
# Experts of one row (a decode step: at T = 1 each expert gets one row) stay phase-wise:
# there every thread streams part of one expert's weights (the few-row kernel,
# ``native.rows_linear``; without the build ``grouped._one_row_products``), and a small
# inference call runs whole in one C++ call (``native.small_forward``), where a split
# worker streams a whole expert alone. Measured (note 8, ms per layer, weights from
# memory, two runs): at 1,512,128,64,8 phases 0.25 and split on the team 0.40-0.46 idle,
# 0.33-0.96 and 1.05-1.23 beside a busy process; at 16,2048,512,64,8 (2 rows per expert)
# 21.7-27.4 and 22.4-26.4 idle, 42.6-64.1 and 29.6-38.2 busy (Python's phase-wise
# path with MKL's forms, before the C++ parts: 40.4-44.0 idle, 87.0-94.1 busy).
SPLIT_MIN_ROWS_PER_EXPERT = 2
# On an idle machine split only experts with at least this much work (multiply-adds
# rows * D * F on average per active expert), by where split's workers run. On torch's
# OpenMP team with split's Python loop (no C++ build, or an activation it lacks) split
# loses at 0.25-0.5M, where each expert's Python overhead, serialised by the GIL,
# outweighs its GEMMs (1024,256,64,32,1: 0.29 of dense against 0.36
# phase-wise), is within noise of phases at 2-4M and ahead from 8M (note 5: 512,512,256,
# 64,8 at 0.68 against 0.63). Pool workers need 8x more: the caller's OpenMP team still
# spins after its last parallel op, so one worker loses its core for a scheduler slice
# (4-7 ms stalls in a 10 ms call at 4096,256,128,16,1: phases 6.8 ms, pool split 10.3 ms).
SPLIT_MIN_WORK_PER_EXPERT = {"team": 4 * 2**20, "pool": 32 * 2**20}
# Split's pass in C++ on the team (``native.py``) pays no Python per expert, and idle it
# leads phases from far less work: (rows, multiply-adds) per active expert from which it
# is chosen. Note 9 and the same A/B ad hoc (phases / split time, 2 cores): fwd+bwd
# 1.15-1.38 at 16 rows (0.25-1M multiply-adds), 0.95-1.17 at 32-256 rows, 1.10-1.19 at
# 8 rows and 1M but 0.83-0.89 at 8 rows and 0.12M, 0.61-0.94 at 4 rows; inference
# 1.15-1.19 at 8 rows and 1M, 0.65-1.05 at 0.5-4 rows (the few-row kernel's ground).
SPLIT_NATIVE_MIN = ((16, 0), (8, 2**20))

_forced = threading.local()


@contextlib.contextmanager
def forced_strategy(name: str | None, runner: str | None = None) -> Iterator[None]:
    """Make :func:`cpu_strategy` return ``name`` in this thread (None: choose by shape),
    and split run on ``runner`` (None: the team where there is one).

    For the benchmarks and tests that compare the strategies on one shape.
    """
    if name is not None and name not in STRATEGIES:
        raise ValueError(f"unknown CPU strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    if runner is not None and runner not in RUNNERS:
        raise ValueError(f"unknown split runner {runner!r}; valid: {', '.join(RUNNERS)}")
    if runner == "team" and openmp_team() is None:
        raise ValueError(
            "split runner 'team' needs torch on OpenMP (libgomp) on Linux; use runner='pool'"
        )
    previous = getattr(_forced, "name", None), getattr(_forced, "runner", None)
    _forced.name, _forced.runner = name, runner
    try:
        yield
    finally:
        _forced.name, _forced.runner = previous


def cpu_strategy(
    counts: Sequence[int],
    dim: int,
    hidden_dim: int,
    threads: int | None = None,
    busy: bool | None = None,
    native: bool = False,
) -> str:
    """Return "split" or "phases" for experts of width ``dim`` -> ``hidden_dim`` holding
    ``counts`` rows, from the shape and how busy the machine is.

    ``threads`` defaults to torch's intra-op thread count, ``busy`` to
    :func:`machine_busy`; ``native``: split's passes would run in C++ (the caller knows:
    the build, the activation, the rows). Split needs at least two threads, at least
    ``SPLIT_MIN_EXPERTS_PER_WORKER`` active experts per thread, no expert holding more
    than one thread's share of the rows (a hot expert would run on one thread while the
    others wait; phase-wise, its GEMMs use every thread) and at least
    ``SPLIT_MIN_ROWS_PER_EXPERT`` rows per active expert on average. It is then chosen
    when the experts hold ``SPLIT_MIN_WORK_PER_EXPERT[runner]`` multiply-adds each on
    average, or, in C++ on the team, reach one of the ``SPLIT_NATIVE_MIN`` (rows,
    multiply-adds) pairs, or when other processes hold the cores torch's threads need.

    Measured on 2 cores (``benchmarks/cpu_notes.py`` notes 5 and 9): above these
    thresholds split is as fast as phases or faster idle, and faster beside a busy
    process (one join per pass instead of a barrier per op); below them phases is as
    fast or faster idle, and split still wins beside a busy process.
    """
    forced = getattr(_forced, "name", None)
    if forced is not None:
        return forced
    threads = torch.get_num_threads() if threads is None else threads
    active = sum(1 for c in counts if c)
    rows = sum(counts)
    if threads < 2 or active < SPLIT_MIN_EXPERTS_PER_WORKER * threads:
        return "phases"
    if max(counts) * threads > rows or rows < SPLIT_MIN_ROWS_PER_EXPERT * active:
        return "phases"
    runner = split_runner()
    if rows * dim * hidden_dim >= SPLIT_MIN_WORK_PER_EXPERT[runner] * active:
        return "split"
    if native and runner == "team":
        for min_rows, min_work in SPLIT_NATIVE_MIN:
            if rows >= min_rows * active and rows * dim * hidden_dim >= min_work * active:
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


# -- torch's OpenMP team -----------------------------------------------------------------------

# void GOMP_parallel(void (*fn)(void *), void *data, unsigned num_threads, unsigned flags):
# libgomp's entry for `#pragma omp parallel`; every thread of the team calls fn(data).
# ctypes takes the GIL for the callback on each thread and releases it around the call.
_TEAM_BODY = ctypes.CFUNCTYPE(None, ctypes.py_object)


@functools.cache
def openmp_team() -> Callable[[Callable[[], None], int], None] | None:
    """``run(fn, threads)``: call ``fn()`` once on each of ``threads`` threads of torch's
    own OpenMP team, returning when all have finished; None where torch's parallel backend
    is not OpenMP from a libgomp this process has loaded (Linux only).

    ``fn`` must not raise (ctypes would print the error and go on); :func:`run_split`
    catches and re-raises.
    """
    if not sys.platform.startswith("linux"):
        return None
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    path = _loaded_libgomp()
    if path is None:
        return None
    try:
        parallel = ctypes.CDLL(path).GOMP_parallel
    except (OSError, AttributeError):
        return None
    parallel.argtypes = [_TEAM_BODY, ctypes.py_object, ctypes.c_uint, ctypes.c_uint]
    parallel.restype = None
    body = _TEAM_BODY(lambda fn: fn())  # kept alive by the closure below

    def run(fn: Callable[[], None], threads: int) -> None:
        parallel(body, fn, threads, 0)

    return run


def _loaded_libgomp() -> str | None:
    """The path of the libgomp torch runs on, among those mapped into this process."""
    try:
        with open("/proc/self/maps") as maps:
            mapped = {line.rstrip("\n").split(maxsplit=5)[-1] for line in maps}
    except OSError:
        return None
    return _torchs_libgomp(mapped, os.path.dirname(torch.__file__))


def _torchs_libgomp(mapped: set[str], torch_dir: str) -> str | None:
    """Of the ``mapped`` paths, torch's libgomp: the one inside torch's package (its PyPI
    wheels bundle one), else a sole system ``libgomp.so.1``. Other packages bundle their
    own copies under other names (scikit-learn's ``libgomp-<hash>.so.1.0.0``): their
    threads are not torch's team, so they are never taken."""
    libgomps = sorted(p for p in mapped if os.path.basename(p).startswith("libgomp"))
    inside = [p for p in libgomps if p.startswith(os.path.join(torch_dir, ""))]
    if inside:
        return inside[0]
    plain = [p for p in libgomps if os.path.basename(p) == "libgomp.so.1"]
    return plain[0] if len(plain) == 1 else None


def split_runner() -> str:
    """Where split's workers run now: "team" or "pool" (as forced, else the team if any)."""
    forced = getattr(_forced, "runner", None)
    if forced is not None:
        return forced
    return "team" if openmp_team() is not None else "pool"


# -- pool workers (no OpenMP team) -------------------------------------------------------------


def _single_threaded(started: threading.Barrier) -> None:
    # ATen sets a thread's count up lazily, from a process-wide default, on its first
    # parallel op: run that set-up first (get_num_threads does), so that this thread
    # keeps the 1 set next. set_num_threads(1) sets OpenMP's and MKL's count of this
    # thread, and also that default, which _pool then puts back.
    torch.get_num_threads()
    torch.set_num_threads(1)
    started.wait()


_POOLS: dict[tuple[int, int], ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def _pool(workers: int) -> ThreadPoolExecutor:
    # Keyed by pid too: a forked child (a DataLoader worker) inherits the object but not
    # its threads.
    key = (os.getpid(), workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            started = threading.Barrier(workers + 1)
            pool = ThreadPoolExecutor(
                workers,
                thread_name_prefix="gatelab-experts",
                initializer=_single_threaded,
                initargs=(started,),
            )
            for _ in range(workers):  # start every worker now, each waiting at the barrier
                pool.submit(int)
            started.wait()
            # Each worker's torch.set_num_threads(1) also set ATen's process-wide default
            # to 1, which every thread started later (and an extension's first parallel
            # region) would take: put the caller's count back (its own count unchanged).
            torch.set_num_threads(torch.get_num_threads())
            _POOLS[key] = pool
    return pool


def run_split(
    work: Callable[[int, int, int], None], counts: Sequence[int], workers: int | None = None
) -> None:
    """Call ``work(expert, start, count)`` for every expert with rows, on ``workers``
    single-threaded workers (default: torch's intra-op thread count), largest first:
    torch's OpenMP team where there is one, else a pool of threads.

    ``start`` is the expert's first row in the expert-sorted rows. With one worker's work
    (one expert, or one worker) the calls run in the calling thread. Returns when every
    call has finished; the first exception raised by a call (Ctrl-C included) is re-raised
    here, once the other workers have finished the calls they were in.
    """
    workers = torch.get_num_threads() if workers is None else workers
    starts, start = [], 0
    for count in counts:
        starts.append(start)
        start += count
    tasks = sorted(((e, starts[e], c) for e, c in enumerate(counts) if c), key=lambda t: -t[2])
    if not tasks:
        return
    queue = iter(tasks)  # next() on a list iterator is atomic under the GIL
    errors: list[BaseException] = []

    def drain() -> None:
        try:
            with torch.no_grad():  # grad mode is thread-local: workers compute raw values
                for task in queue:
                    if errors:  # another worker failed (or was interrupted): stop early
                        return
                    work(*task)
        except BaseException as error:  # noqa: BLE001 - re-raised in the caller
            errors.append(error)

    threads = min(workers, len(tasks))
    if threads == 1:  # one worker's work: the caller's own thread does it, as phases would
        drain()
    elif split_runner() == "team":
        openmp_team()(drain, threads)
    else:
        for future in [_pool(workers).submit(drain) for _ in range(threads)]:
            future.result()
    if errors:
        raise errors[0]
