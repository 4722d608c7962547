"""The grouped dispatcher's CPU strategies (issue 17), each against the loop oracle.

``phases`` (each phase over all experts, multi-threaded ops; its GEMMs one MKL batched
call, or a loop of torch.mm) and ``split`` (each expert's whole pass on one
single-threaded worker) are forced in turn with ``cpu_threads.forced_strategy``; all must equal the loop dispatcher in float64, outputs
and every gradient, on random shapes and on the edge cases, and the inference path (no
autograd node) must equal the training path. :func:`cpu_strategy`'s rule is tested on
shapes and a stated machine load, and the load reading on faked counters, never on timings.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
import time

import pytest
import torch
from conftest import EDGE_CASES, DispatchCase, bank_tensors, dispatch_cases, grads_of
from hypothesis import given, settings
from hypothesis import strategies as st

from gatelab.bench.common import busy_processes
from gatelab.dispatch import (
    cpu_threads,
    gemm_batch,
    grouped,
    grouped_dispatch,
    loop_dispatch,
    native,
)
from gatelab.dispatch.cpu_threads import (
    BUSY_CORES,
    LOAD_WINDOW_S,
    SPLIT_MIN_WORK_PER_EXPERT,
    SPLIT_NATIVE_MIN,
    cpu_strategy,
    forced_strategy,
    machine_busy,
    openmp_team,
    run_split,
    split_runner,
)
from gatelab.dispatch.grouped import _FEW_ROWS, sort_slots, sort_slots_host
from gatelab.experts.activation import Plain, as_activation

SAME_BITS = ("phases", "phases-loop", "split", "split-python", "split-pool")
"""What the tests force: phase-wise (its GEMMs one MKL batched call where torch has MKL),
phase-wise looping over experts with torch.mm, split on its default runner (torch's
OpenMP team where torch runs on libgomp; its pass in C++ where that builds), split's
Python loop on the team, split on pool workers. With the C++ build, experts of up to
``native.ROWS_MAX`` rows take its few-row kernel in all of them: they give the same bits."""
STRATEGIES = (*SAME_BITS, "phases-mkl", "split-mkl")
"""Also phase-wise and split with few-row experts on MKL's forms (no C++ build)."""
RUNNERS = ("pool", "team") if openmp_team() is not None else ("pool",)
THREADS = torch.get_num_threads()
needs_team = pytest.mark.skipif(
    openmp_team() is None, reason="torch's parallel backend here is not OpenMP on libgomp"
)
NAMES = ["x", "weights", "w_in", "w_out", "b_in", "b_out"]


@contextlib.contextmanager
def forced(variant: str | None):
    """``forced_strategy`` for one of ``STRATEGIES`` (None: the rule's own choice)."""
    name, _, runner = (variant or "").partition("-")
    switches = {
        "loop": gemm_batch.disabled,
        "python": lambda: native.disabled("split"),
        "mkl": lambda: native.disabled("rows"),
    }
    off = switches.get(runner)
    with forced_strategy(name or None, None if off else runner or None):
        with off() if off else contextlib.nullcontext():
            yield


def assert_matches_loop(
    case: DispatchCase, strategy: str, dtype=torch.float64, tol=1e-10, activate=None
):
    x, experts, weights, bank = case.build(dtype)
    if activate is not None:
        bank = bank._replace(activate=activate)
    inputs = [x, weights, *bank_tensors(bank)]
    want = loop_dispatch(x, experts, weights, bank, case.deterministic)
    want_grads = grads_of(want, inputs)
    with forced(strategy):
        got = grouped_dispatch(x, experts, weights, bank, case.deterministic)
        got_grads = grads_of(got, inputs)
        with torch.no_grad():
            inferred = grouped_dispatch(x, experts, weights, bank, case.deterministic)
    torch.testing.assert_close(got, want, atol=tol, rtol=tol, msg=lambda m: f"{case}\n{m}")
    torch.testing.assert_close(inferred, got.detach(), atol=0, rtol=0)
    for name, g, w in zip(NAMES, got_grads, want_grads, strict=False):
        torch.testing.assert_close(
            g, w, atol=tol, rtol=tol, msg=lambda m, n=name: f"grad {n}: {case}\n{m}"
        )


@pytest.mark.parametrize("strategy", STRATEGIES)
@settings(max_examples=25, deadline=None)
@given(case=dispatch_cases(max_tokens=80))
def test_strategy_matches_loop_float64(strategy, case):
    assert_matches_loop(case, strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("name", sorted(EDGE_CASES))
def test_strategy_edge_cases_float64(strategy, name):
    assert_matches_loop(EDGE_CASES[name], strategy)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("rows", range(1, 8))
def test_few_rows_per_expert(strategy, rows):
    """1..7 rows per expert cross the few-rows rule (W @ x.T for 1..4 rows)."""
    assert _FEW_ROWS == (1, 4)
    case = DispatchCase(rows, 6, 10, 1, 1, bias=True, seed=rows)
    assert_matches_loop(case, strategy)
    case = DispatchCase(rows * 3, 6, 10, 3, 1, glu=False, seed=rows)  # about `rows` each
    assert_matches_loop(case, strategy)


@pytest.mark.parametrize("dim, hidden, glu", [(6, 10, True), (7, 9, False), (16, 24, True)])
def test_one_row_forms(dim, hidden, glu):
    """One row per expert (a decode step) through each form: a bmm over row blocks of W
    (widths divisible into blocks) and a duplicated row (odd widths); forward and backward
    against the loop oracle, for both strategies."""
    for tokens, experts, k in ((1, 4, 3), (3, 12, 2)):  # every expert gets at most one row
        case = DispatchCase(tokens, dim, hidden, experts, k, glu=glu, bias=True, seed=dim)
        for strategy in STRATEGIES:
            assert_matches_loop(case, strategy)


def test_one_row_bmm_bits_do_not_depend_on_blocks_or_threads():
    """The row-block bmm gives each row's dot product the same way whatever the block
    count and thread count (split's one-thread workers, phases' two threads)."""
    w, x = torch.randn(96, 40, dtype=torch.float64), torch.randn(1, 40, dtype=torch.float64)
    outputs = []
    for threads in (1, 2):
        for blocks in (2, 4, 8):
            torch.set_num_threads(threads)
            try:
                col = x.t().expand(blocks, -1, 1)
                outputs.append(torch.bmm(w.view(blocks, -1, 40), col).reshape(1, -1))
            finally:
                torch.set_num_threads(THREADS)
    assert all(torch.equal(outputs[0], o) for o in outputs[1:])


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_float32_larger_shape(strategy):
    """A larger shape in float32, each strategy forced."""
    case = DispatchCase(300, 24, 16, 12, 3, bias=True, empty_rate=0.1, seed=11)
    assert_matches_loop(case, strategy, torch.float32, tol=2e-5)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("glu", [False, True])
def test_strategy_with_a_callable_activation(strategy, glu):
    """Any callable (HF's ``_apply_gate``, say) runs through AutogradActivation, whose
    forward returns a new tensor instead of writing the buffer it is given."""

    def gated(hidden):
        gate, up = hidden.chunk(2, dim=-1)
        return torch.tanh(gate) * (up + 1)

    case = DispatchCase(200, 8, 6, 10, 2, glu=glu, bias=True, seed=4)
    assert_matches_loop(case, strategy, activate=gated if glu else torch.tanh)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_out_of_range_ids_refused(strategy):
    x, experts, weights, bank = DispatchCase(5, 4, 8, 3, 2).build()
    experts = experts.clone()
    experts[2, 0] = 3
    with forced(strategy), pytest.raises(ValueError, match="valid ids are 0..2"):
        grouped_dispatch(x, experts, weights, bank)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(256, 64, 48, 8, 2), (300, 96, 80, 12, 3)])
def test_split_and_phases_give_the_same_bits(shape, bias):
    """cpu_strategy's choice can follow the machine's load (machine_busy), so the
    strategies (and split's two runners) must agree bit for bit, outputs and gradients, in
    float32: MKL's GEMMs split their outputs, not their sums, between threads. Should this
    fail (another BLAS, another torch), the load-dependent choice would change results and
    must be revisited. Not so for experts of a few rows: see the next test."""
    case = DispatchCase(*shape, bias=bias, seed=7)
    x, experts, weights, bank = case.build(torch.float32)
    inputs = [x, weights, *bank_tensors(bank)]
    for group in (SAME_BITS, ("phases-mkl", "split-mkl")):
        results = []
        for strategy in group:
            with forced(strategy):
                out = grouped_dispatch(x, experts, weights, bank)
                results.append([out.detach(), *grads_of(out, inputs)])
        names = ["out", *NAMES][: len(results[0])]
        for name, phases, *splits in zip(names, *results, strict=True):
            assert all(torch.equal(phases, split) for split in splits), (group, name)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(20, 64, 32, 16, 2), (9, 96, 64, 8, 3), (2, 64, 64, 4, 2)])
def test_strategies_give_the_same_bits_at_decode(shape, bias):
    """Inference with experts of 0 to about 6 rows (a decode step), where the strategy
    may follow the load too: the same output bits, through the C++ few-row kernel (one
    dot product per output, whatever the threads). Two things keep this from gradients
    and other widths, so it is not claimed there: MKL's GEMMs of 5-7 rows give other bits
    on one thread than on two, and ATen's elementwise kernels run the elements of a slice
    that fill no whole pair of vectors with scalar code (silu, gelu and their backward
    then differ in the last bit), so the widths here are multiples of 32 floats."""
    case = DispatchCase(*shape, bias=bias, seed=7)
    x, experts, weights, bank = case.build(torch.float32)
    outputs = []
    for strategy in SAME_BITS:
        with forced(strategy), torch.no_grad():
            outputs.append(grouped_dispatch(x, experts, weights, bank))
    assert all(torch.equal(outputs[0], other) for other in outputs[1:])


def test_split_is_reproducible_run_to_run():
    case = DispatchCase(400, 16, 12, 16, 4, bias=True, seed=3)
    x, experts, weights, bank = case.build(torch.float32)
    with forced_strategy("split"):
        first = grouped_dispatch(x, experts, weights, bank)
        for _ in range(3):
            again = grouped_dispatch(x, experts, weights, bank)
            torch.testing.assert_close(again, first, atol=0, rtol=0)


@needs_team
@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler to build the loop")
def test_split_runs_its_cpp_loop_where_it_builds(monkeypatch):
    """With a compiler the C++ loop builds, and split on the team runs both passes in
    it (the bit test above then compares it with the Python loop and phases)."""
    assert native.available()
    calls = []
    for name in ("forward", "backward"):
        real = getattr(native, name)
        monkeypatch.setattr(
            native, name, lambda *a, real=real, name=name: (calls.append(name), real(*a))[1]
        )
    case = DispatchCase(256, 64, 48, 8, 2, seed=1)
    x, experts, weights, bank = case.build(torch.float32)
    with forced("split"):
        grouped_dispatch(x, experts, weights, bank).sum().backward()
    assert calls == ["forward", "backward"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_threads_started_later_keep_torchs_thread_count(strategy):
    """Pool workers set themselves to one thread, which ATen also stores as the default
    every later thread (and an extension's first parallel region) starts from: the pool
    puts it back, so no strategy leaves later threads, or the caller, single-threaded."""
    cpu_threads._POOLS.clear()  # a fresh pool: its workers start during this call
    case = DispatchCase(256, 64, 48, 8, 2, seed=2)
    x, experts, weights, bank = case.build(torch.float32)
    with forced(strategy):
        grouped_dispatch(x, experts, weights, bank).sum().backward()
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert seen == [THREADS] and torch.get_num_threads() == THREADS


def test_cpp_loop_falls_back_to_python_when_it_cannot_build(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp_extension

    def no_compiler(**kwargs):
        raise RuntimeError("Error building extension: c++ not found")

    build = native._build.__wrapped__  # uncached
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    assert build() is False
    assert "keeps its Python loop" in caplog.text and "c++ not found" in caplog.text
    monkeypatch.setenv("GATELAB_NATIVE", "0")
    assert build() is False
    with native.disabled():
        assert not native.available()


def test_cpp_loop_leaves_few_rows_and_other_activations_to_python():
    from gatelab.dispatch.grouped import _native_split
    from gatelab.experts.activation import GLU, AutogradActivation

    assert _native_split(AutogradActivation(torch.tanh), [40, 50]) is None
    assert _native_split(GLU("silu"), [40, _FEW_ROWS[1]]) is None  # a few-row expert
    assert _native_split(GLU("silu"), [0, 0]) is None
    if native.available() and split_runner() == "team":  # with the few-row kernel: C++
        assert _native_split(GLU("silu"), [40, 1], few=native.ROWS_MAX) is not None


def test_pool_workers_are_single_threaded():
    threads = torch.get_num_threads()
    seen = []
    with forced_strategy(None, "pool"):
        run_split(lambda e, start, count: seen.append(torch.get_num_threads()), [3, 0, 2], 2)
    assert seen == [1, 1]  # one call per expert with rows, single-threaded
    assert torch.get_num_threads() == threads


@needs_team
def test_team_workers_run_inside_torchs_openmp_region():
    """On the team each call runs inside an active OpenMP parallel region of the libgomp
    torch uses, on up to ``workers`` threads, and nothing changes the caller's thread
    count."""
    gomp = ctypes.CDLL(cpu_threads._loaded_libgomp())
    threads = torch.get_num_threads()
    seen = []

    def work(e, start, count):
        seen.append((gomp.omp_in_parallel(), threading.get_ident()))
        time.sleep(0.01)  # long enough for the second thread to take an expert

    run_split(work, [1] * 6, workers=2)
    assert len(seen) == 6 and all(inside == 1 for inside, _ in seen)
    assert len({ident for _, ident in seen}) == 2
    assert gomp.omp_in_parallel() == 0 and torch.get_num_threads() == threads


@needs_team
def test_regions_opened_inside_the_team_run_on_one_thread():
    """What makes the workers' ops single-threaded: a parallel region opened inside the
    team's (as torch's ops and MKL open theirs) gets a team of one thread."""
    gomp = ctypes.CDLL(cpu_threads._loaded_libgomp())
    team, sizes = openmp_team(), []
    team(lambda: team(lambda: sizes.append(gomp.omp_get_num_threads()), 2), 2)
    assert sizes == [1, 1]


def test_dispatch_never_changes_the_callers_thread_count(monkeypatch):
    """Toggling torch's thread count in the calling thread (tried for decode beside a busy
    process) made split workers' GEMMs give other bits now and then; only the workers
    may set theirs. Decode and training shapes, idle and busy, both strategies."""
    calls = []
    set_threads = torch.set_num_threads
    main = threading.current_thread()

    def spy(n):
        if threading.current_thread() is main:
            calls.append(n)
        set_threads(n)

    monkeypatch.setattr(torch, "set_num_threads", spy)
    for busy in (False, True):
        monkeypatch.setattr(cpu_threads, "machine_busy", lambda threads=None, b=busy: b)
        for case in (DispatchCase(1, 8, 6, 4, 2, seed=1), DispatchCase(64, 8, 6, 8, 2, seed=2)):
            for strategy in (None, *STRATEGIES):  # None: the rule's own choice
                x, experts, weights, bank = case.build(torch.float32)
                with forced(strategy):
                    grouped_dispatch(x, experts, weights, bank).sum().backward()
                    with torch.no_grad():
                        grouped_dispatch(x, experts, weights, bank)
    assert calls == []


@pytest.mark.parametrize("runner", RUNNERS)
def test_run_split_visits_each_expert_once_with_its_rows(runner):
    calls = []
    with forced_strategy(None, runner):
        run_split(lambda e, start, count: calls.append((e, start, count)), [2, 0, 5, 1], 2)
        run_split(lambda e, start, count: calls.append("none"), [0, 0], 2)  # no experts
    assert sorted(calls) == [(0, 0, 2), (2, 2, 5), (3, 7, 1)]


@pytest.mark.parametrize("runner", RUNNERS)
def test_run_split_reraises_a_workers_error(runner):
    def fail(e, start, count):
        if e == 1:
            raise RuntimeError("expert 1 failed")

    with forced_strategy(None, runner), pytest.raises(RuntimeError, match="expert 1 failed"):
        run_split(fail, [1, 1, 1], workers=2)


@pytest.mark.parametrize("runner", RUNNERS)
def test_a_workers_error_stops_the_others_early(runner):
    calls = []

    def fail_first(e, start, count):
        calls.append(e)
        if len(calls) == 1:
            raise KeyboardInterrupt
        time.sleep(0.005)

    with forced_strategy(None, runner), pytest.raises(KeyboardInterrupt):
        run_split(fail_first, [1] * 40, workers=2)
    assert len(calls) < 40


@pytest.mark.parametrize("runner", RUNNERS)
def test_rule_depends_on_threads_experts_rows_work_and_balance(runner):
    work = SPLIT_MIN_WORK_PER_EXPERT[runner]
    dim, hidden = 512, 256
    rows = work // (dim * hidden)  # rows per expert that reach the work threshold

    def rule(counts, threads=2, busy=False, dim=dim):
        with forced_strategy(None, runner):
            return cpu_strategy(counts, dim, hidden, threads=threads, busy=busy)

    for busy in (False, True):  # enough work: split whether or not the machine is busy
        assert rule([rows] * 64, busy=busy) == "split"
    assert rule([0] * 60 + [rows] * 4) == "split"  # idle experts
    small = [rows - 1] * 64
    assert rule(small) == "phases"  # little work ...
    assert rule(small, busy=True) == "split"  # ... but busy
    ones = [1] * 64  # a decode step: one row per expert, phase-wise even with much work
    for busy in (False, True):
        assert rule(ones, busy=busy, dim=10 * work) == "phases"
    assert rule([2] * 64, dim=work) == "split"
    hot = [10 * rows, rows, rows, rows, rows]
    for busy in (False, True):  # never split: one thread, too few experts, a hot expert
        assert rule([rows] * 64, threads=1, busy=busy) == "phases"
        assert rule([rows] * 3, busy=busy) == "phases"
        assert rule(hot, busy=busy) == "phases"


def test_split_in_cpp_is_chosen_from_fewer_rows_and_less_work():
    """SPLIT_NATIVE_MIN: with split's passes in C++ on the team, idle split from 16 rows
    per expert at any width and from 8 rows with enough work; never for the pool."""
    (rows, _), (some_rows, some_work) = SPLIT_NATIVE_MIN
    dim = 64
    hidden = some_work // (some_rows * dim)  # some_rows rows of this width reach some_work

    def rule(counts, native=True, runner="team", hidden=hidden):
        with forced_strategy(None, runner):
            return cpu_strategy(counts, dim, hidden, threads=2, busy=False, native=native)

    assert rule([rows] * 64, hidden=1) == "split"
    assert rule([rows] * 64, native=False, hidden=1) == "phases"
    assert rule([rows - 1] * 64, hidden=1) == "phases"
    assert rule([some_rows] * 64) == "split"
    assert rule([some_rows] * 64, hidden=hidden - 1) == "phases"
    assert rule([some_rows - 1] * 64, hidden=2 * hidden) == "phases"  # work, too few rows
    assert rule([rows] * 64, runner="pool", hidden=1) == "phases"
    assert rule([10 * rows] + [rows] * 3) == "phases"  # a hot expert still stays phase-wise


@pytest.mark.skipif(
    openmp_team() is None or not native.available(), reason="needs the team and the C++ build"
)
def test_dispatch_tells_the_rule_where_split_runs_in_cpp():
    """grouped asks with native=True only where both of split's passes would run in C++."""
    silu = Plain("silu")
    assert grouped._cpu_strategy([16] * 64, torch.empty(64, 64, 1), silu) == "split"
    assert grouped._cpu_strategy([16] * 63 + [4], torch.empty(64, 64, 1), silu) == "phases"

    def custom(h):  # an activation the C++ loop lacks: the Python loop's threshold
        return h.relu()

    custom_act = as_activation(custom)
    assert grouped._cpu_strategy([16] * 64, torch.empty(64, 64, 1), custom_act) == "phases"


def test_no_team_without_openmp_or_libgomp(monkeypatch):
    find_team = cpu_threads.openmp_team.__wrapped__  # uncached
    monkeypatch.setattr(torch.__config__, "parallel_info", lambda: "ATen parallel backend: native")
    assert find_team() is None
    monkeypatch.undo()
    monkeypatch.setattr(cpu_threads, "_loaded_libgomp", lambda: None)
    assert find_team() is None


def test_torchs_libgomp_is_told_from_other_packages_copies():
    torch_dir = "/env/site-packages/torch"
    sklearn = "/env/site-packages/scikit_learn.libs/libgomp-e985bcbb.so.1.0.0"
    system = "/usr/lib/x86_64-linux-gnu/libgomp.so.1"
    wheel = torch_dir + "/lib/libgomp.so.1"
    find = cpu_threads._torchs_libgomp
    assert find({sklearn, wheel, "/usr/lib/libc.so.6"}, torch_dir) == wheel
    assert find({sklearn, system}, torch_dir) == system  # a torch built on the system's
    assert find({sklearn}, torch_dir) is None
    other = "/env/site-packages/torch_other/libgomp-1a2b.so.1"  # not inside torch's folder
    assert find({other}, torch_dir) is None
    assert find(set(), torch_dir) is None


@pytest.mark.parametrize("runner", RUNNERS)
def test_one_workers_work_runs_in_the_calling_thread(runner):
    """One expert, or one worker: no region or pool (a one-thread OpenMP region would let
    the ops inside open two-thread regions of their own)."""
    caller, seen = threading.get_ident(), []
    with forced_strategy(None, runner):
        run_split(lambda *task: seen.append(threading.get_ident()), [0, 3, 0], workers=2)
        run_split(lambda *task: seen.append(threading.get_ident()), [1, 3, 2], workers=1)
    assert seen == [caller] * 4


@needs_team
def test_split_inside_split_runs_in_one_thread():
    """A split pass started from a worker (a nested OpenMP region: one thread) finishes."""
    calls = []

    def outer(e, start, count):
        run_split(lambda *task: calls.append(task), [1, 2], workers=2)

    run_split(outer, [1, 1, 1], workers=2)
    assert sorted(calls) == sorted([(0, 0, 1), (1, 1, 2)] * 3)


@needs_team
def test_split_from_two_python_threads_at_once():
    """Each calling thread gets its own OpenMP team; the results are the usual bits."""
    case = DispatchCase(300, 24, 16, 12, 3, bias=True, seed=5)
    x, experts, weights, bank = case.build(torch.float32)
    with forced_strategy("split"):
        want = grouped_dispatch(x, experts, weights, bank)
    got, errors = [], []

    def call():
        try:
            with forced_strategy("split"):
                for _ in range(5):
                    got.append(grouped_dispatch(x, experts, weights, bank))
        except BaseException as error:  # noqa: BLE001 - reported below
            errors.append(error)

    callers = [threading.Thread(target=call) for _ in range(2)]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert not errors and len(got) == 10
    assert all(torch.equal(g, want) for g in got)


def test_the_team_splits_smaller_experts_than_the_pool():
    assert SPLIT_MIN_WORK_PER_EXPERT["team"] < SPLIT_MIN_WORK_PER_EXPERT["pool"]
    if openmp_team() is not None:  # the default runner where there is a team
        assert cpu_threads.split_runner() == "team"


class _FakeClock:
    """Stands in for the ``time`` module the load sampler reads."""

    def __init__(self):
        self.wall = self.own = 0.0

    def monotonic(self):
        return self.wall

    def process_time(self):
        return self.own


def test_machine_busy_counts_other_processes_cpu_time(monkeypatch):
    """Busy = other processes' CPU time per wall second (all CPUs' busy time minus this
    process's) above os.cpu_count() - threads + BUSY_CORES, re-read every window."""
    clock, system = _FakeClock(), [0.0]
    monkeypatch.setattr(cpu_threads, "time", clock)
    monkeypatch.setattr(cpu_threads, "_system_busy_s", lambda: system[0])
    monkeypatch.setattr(cpu_threads, "_LOAD", cpu_threads._LoadSampler())
    monkeypatch.setattr(cpu_threads, "_CPUS", 2)
    assert not machine_busy(2)  # the first call has no window yet

    def window(other_cores: float, own_cores: float) -> bool:
        clock.wall += LOAD_WINDOW_S
        clock.own += own_cores * LOAD_WINDOW_S
        system[0] += (other_cores + own_cores) * LOAD_WINDOW_S
        return machine_busy(2)

    assert not window(other_cores=0.1, own_cores=2.0)  # this process's own threads
    assert window(other_cores=1.0, own_cores=1.0)  # one busy neighbour
    clock.wall += LOAD_WINDOW_S / 2  # within the window: the last answer
    assert machine_busy(2)
    assert not window(other_cores=BUSY_CORES - 0.1, own_cores=0.0)
    assert window(other_cores=BUSY_CORES + 0.1, own_cores=0.0)
    # One thread needs one of the two cores: a neighbour on the other is no contention.
    clock.wall += LOAD_WINDOW_S
    system[0] += LOAD_WINDOW_S
    assert not machine_busy(1)


def test_machine_busy_without_proc_stat_is_never_busy(monkeypatch):
    monkeypatch.setattr(cpu_threads, "_system_busy_s", lambda: None)
    monkeypatch.setattr(cpu_threads, "_LOAD", cpu_threads._LoadSampler())
    assert not machine_busy(2)
    assert cpu_strategy([300] * 64, 64, 64, threads=2) == "phases"


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_machine_busy_sees_a_spinning_process(monkeypatch):
    """The real counters: a process spinning on one core reads as busy when torch's
    threads need every core (only this direction: an idle reading depends on the host)."""
    monkeypatch.setattr(cpu_threads, "_LOAD", cpu_threads._LoadSampler())
    threads = cpu_threads._CPUS
    with busy_processes(1):
        machine_busy(threads)
        deadline = time.monotonic() + 10
        while not machine_busy(threads) and time.monotonic() < deadline:
            time.sleep(LOAD_WINDOW_S)
        assert machine_busy(threads)


def test_forced_strategy_is_validated_and_restored():
    with pytest.raises(ValueError, match="valid: phases, split"):
        with forced_strategy("fast"):
            pass
    with pytest.raises(ValueError, match="valid: team, pool"):
        with forced_strategy("split", "threads"):
            pass
    with forced_strategy("split"):
        assert cpu_strategy([1], 4, 4) == "split"
    assert cpu_strategy([1], 4, 4) == "phases"


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.sampled_from([0, 1, 2, 5, 12, 70]),
    num_experts=st.integers(1, 9),
    top_k=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    dtype=st.sampled_from([torch.int64, torch.int32]),
)
def test_host_and_cpp_sorts_equal_the_torch_sort(tokens, num_experts, top_k, seed, dtype):
    """The Python host sort and the C++ counting sort (``native.sort_slots``, int64 ids)
    give the torch ops' six tensors exactly, with EMPTY slots and ids outside the bank
    as padding rows."""
    gen = torch.Generator().manual_seed(seed)
    experts = torch.randint(-3, num_experts + 3, (tokens, top_k), generator=gen).to(dtype)
    with native.disabled("sort"):
        want = sort_slots(experts, num_experts)
    sorts = [sort_slots_host(experts, num_experts)]
    if native.sort_fits(experts):
        sorts.append(native.sort_slots(experts, num_experts))
    names = ["slots", "tokens", "experts", "counts", "offsets", "valid"]
    for got in sorts:
        for name, g, w in zip(names, got, want, strict=True):
            assert g.dtype == w.dtype, name
            torch.testing.assert_close(g, w, atol=0, rtol=0, msg=name)
