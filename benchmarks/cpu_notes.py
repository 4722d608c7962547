"""The measurements behind the CPU dispatch choices (docs/benchmarks.md, "CPU strategies").

    python benchmarks/cpu_notes.py            # all notes, about 15 minutes on 2 cores
    python benchmarks/cpu_notes.py --only 3   # one note

Everything compared is timed side by side in one process (median of 7 after 3 warm-up
calls; notes 5, 11 and 12 alternate their variants round-robin; note 10 takes the mean
of 2,000 back-to-back calls of a few microseconds each). Run it on an idle machine; note 5
starts its own busy process for the contended half (``busy_processes``, as
``gatelab bench moe --contended`` does); notes 5 and 6 run issue 17's training shapes.

1. Fresh vs reused output: a 64-expert GEMM set into a new 64 MB tensor (torch's
   grouped_mm) vs into a reused buffer; why ``workspace.py`` pools buffers.
2. The same for a weight gradient [64, 512, 512], and the first touch alone: filling a
   new [128, 128, 512] tensor (fine-128's w_in gradient) against a reused one; why
   ``workspace.gradient_buffer`` keeps each weight's gradient buffers.
3. Few rows (``native.ROWS_MAX``, ``grouped._FEW_ROWS``): x @ W.T, W @ x.T, W @ (x.T
   contiguous) and the C++ few-row kernel for 1-12 rows of one expert, two weight
   shapes, weights in cache and streamed from memory; for one row also the GEMV, a
   duplicated row and the bmm over row blocks of W that ``_one_row_products`` runs.
4. GEMM efficiency against rows per expert, one thread and two: GFLOP/s of
   [rows, 512] @ [512, 512] (why small experts cost more than their FLOPs, and where two
   threads on one GEMM stop paying: ``cpu_threads.SPLIT_MAX_ROWS_PER_EXPERT``).
5. The two strategies (``cpu_threads``) on MoE layers, fwd+bwd ratio to the equal-FLOP
   dense MLP, idle and with one busy process: phases (its GEMMs MKL batched calls, and
   as a torch.mm loop), split on pool workers and on torch's OpenMP team (its pass in
   C++, ``dispatch/native.py``, and its Python loop), on the sweep's training shapes and three with less work per
   expert: the effects behind ``cpu_strategy`` and ``SPLIT_MIN_WORK_PER_EXPERT``.
6. The six fwd+bwd GEMMs alone, the experts' (T*k/E rows each) against the dense MLP's,
   idle and beside a busy process: two-thread GEMMs expert after expert (the torch.mm
   loop), one MKL batched call per GEMM (``gemm_batch``, phases) and one-thread GEMMs
   side by side on the OpenMP team (split): the ratio no dispatcher built on these GEMMs
   can pass, and why phases batches its GEMMs.
7. A decode step's small ops timed right after a two-thread op, idle and beside a busy
   process: the bmm of W's row blocks on two threads and on one, MKL's one-thread GEMV,
   and index_add_ of two rows on two threads and on one. What one-thread forms would gain
   beside a busy process; the dispatcher does not use them (docs/benchmarks.md: toggling
   the caller's thread count changed split workers' results).
8. Decode-sized calls (1-16 tokens), idle and busy: phase-wise in one C++ call
   (``native.small_forward``), from Python with the few-row kernel, from Python with
   MKL's few-row forms (before the C++ parts), and split on the team: why experts of
   one row stay phase-wise (``SPLIT_MIN_ROWS_PER_EXPERT``) and what the C++ parts gain.
9. Phases against split with its pass in C++, idle, training (fwd+bwd) and inference
   shapes of 0.5 to 256 rows per expert, most below the Python loop's work threshold:
   where split in C++ starts to pay (``cpu_threads.SPLIT_NATIVE_MIN``).
10. An expert's SwiGLU elementwise work on one thread, at the rows and width each
    expert gets in the sweep's small-expert shapes: ``GLU.forward_into`` and
    ``backward_into`` (what every strategy runs) against the SiLU and its backward
    alone, which a fused one-pass kernel would still compute: what fusing the passes
    could save (docs/benchmarks.md, issue 17's results at commit abe0281).
11. A Mixtral router's selection, forward and backward without its GEMM: softmax, top-k
    of the probabilities and renormalising (``TopKRouter(normalize=True)``, as HF's
    Mixtral) against the same weights as a softmax over the k chosen logits, alternating,
    at the sweep's router shapes (docs/benchmarks.md, the same section).
12. The router's gradient into the layer input: an MoE step as built against the same
    step with the router reading a detached input (its weight gradient still computed),
    alternating with the dense MLP, on top1-16 and fine-short. Two consumers of x give
    autograd two fresh [T, D] gradients to add where the dense MLP has one.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, warmup: int = 3, repeats: int = 7) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def loop_mm(x, w_t, counts, out):
    start = 0
    for e, count in enumerate(counts):
        torch.mm(x[start : start + count], w_t[e], out=out[start : start + count])
        start += count
    return out


def note_fresh_output() -> None:
    experts, rows, dim, width = 64, 512, 512, 512
    x = torch.randn(experts * rows, dim)
    w = torch.randn(experts, width, dim)
    counts = [rows] * experts
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    reused = torch.empty(experts * rows, width)
    fresh = median_ms(lambda: F.grouped_mm(x, w.transpose(1, 2), offs=offsets))
    kept = median_ms(lambda: loop_mm(x, w.transpose(1, 2), counts, reused))
    print(
        f"1. 64 x [512,512]x[512,512]: grouped_mm (new 64 MB output) {fresh:.1f} ms, "
        f"loop of mm into a reused buffer {kept:.1f} ms"
    )


def note_fresh_weight_grad() -> None:
    experts, rows, dim, width = 64, 512, 512, 512
    x, grad = torch.randn(experts * rows, dim), torch.randn(experts * rows, width)
    buffer = torch.empty(experts, width, dim)

    def weight_grad(out):
        for e in range(experts):
            r = slice(e * rows, (e + 1) * rows)
            torch.mm(grad[r].t(), x[r], out=out[e])

    fresh = median_ms(lambda: weight_grad(torch.empty(experts, width, dim)))
    kept = median_ms(lambda: weight_grad(buffer))
    print(
        f"2. weight gradient [64, 512, 512]: new 64 MB tensor {fresh:.1f} ms, reused {kept:.1f} ms"
    )
    shape = (128, 128, 512)  # 32 MB: above glibc's largest mmap threshold
    reused = torch.empty(shape)
    fresh = median_ms(lambda: torch.empty(shape).fill_(1.0))
    kept = median_ms(lambda: reused.fill_(1.0))
    print(f"   fill [128, 128, 512]: new tensor {fresh:.1f} ms, reused {kept:.1f} ms")


def _few_rows_forms(x, ws) -> dict:
    """The ways to multiply c rows x by each expert weight W in ws."""
    from gatelab.dispatch import native

    xt = x.t().contiguous()
    forms = {
        "x @ W.T": lambda: [torch.mm(x, w.t()) for w in ws],
        "W @ x.T": lambda: [torch.mm(w, x.t()) for w in ws],
        "W @ xT (col-major x)": lambda: [torch.mm(w, xt) for w in ws],
    }
    if x.shape[0] == 1:
        forms["W @ [x; x].T"] = lambda: [torch.mm(w, torch.cat([x, x]).t()) for w in ws]
        forms["GEMV W @ x"] = lambda: [torch.mv(w, x[0]) for w in ws]
        from gatelab.dispatch.grouped import _row_blocks

        blocks = _row_blocks(ws[0].shape[0])  # as the dispatcher splits W
        col = x.t().expand(blocks, -1, 1)  # strides (0, 1, in): bmm's transposed layout
        forms["bmm of W's row blocks"] = lambda: [
            torch.bmm(w.view(blocks, -1, w.shape[1]), col) for w in ws
        ]
    w_all = torch.stack(ws)  # [E, out, in], as the bank holds them
    out = torch.empty(x.shape[0], w_all.shape[1])
    if native.rows_fit(x, w_all, out):
        threads, count = torch.get_num_threads(), [x.shape[0]]
        forms["C++ few-row kernel"] = lambda: [
            native.rows_linear(x, w_all, [e], [0], count, out, threads) for e in range(len(ws))
        ]
    return forms


def note_few_rows() -> None:
    print("3. one expert's weight [out, in] times c rows, us per expert (GB/s read)")
    for out_dim, in_dim in ((2048, 512), (512, 1024)):
        for label, copies in (("in cache", 2), ("from memory", 48)):
            ws = [torch.randn(out_dim, in_dim) for _ in range(copies)]
            for rows in (1, 2, 3, 4, 6, 8, 12):
                cells = []
                for name, fn in _few_rows_forms(torch.randn(rows, in_dim), ws).items():
                    us = median_ms(fn) * 1e3 / copies
                    cells.append(f"{name} {us:6.0f} ({4 * out_dim * in_dim / us / 1e3:4.1f})")
                print(f"   [{out_dim}, {in_dim}] {label:11s} c={rows}: " + "  ".join(cells))


def _gflops(rows: int, batch: int, threads: int) -> float:
    torch.set_num_threads(threads)
    x, w, out = torch.randn(rows, 512), torch.randn(512, 512), torch.empty(rows, 512)
    ms = median_ms(lambda: [torch.mm(x, w.t(), out=out) for _ in range(batch)])
    return 2 * rows * 512 * 512 * batch / ms / 1e6


def note_gemm_efficiency() -> None:
    print("4. [rows, 512] @ [512, 512] GEMM, GFLOP/s with 1 and 2 threads")
    threads = torch.get_num_threads()
    try:
        for rows in (32, 64, 128, 256, 512, 1024, 2048):
            batch = max(1, 4096 // rows)  # about the same FLOPs per timed call
            cells = [f"{n} thread(s) {_gflops(rows, batch, n):6.1f}" for n in (1, threads)]
            print(f"   rows {rows:5d}: " + "  ".join(cells))
    finally:
        torch.set_num_threads(threads)


# Shapes at and below the team's work threshold (rows * D * F per expert: 0.5M, 2M, 4M), added to
# the sweep's training shapes in note 5 to show where split stops paying idle.
SMALL_EXPERT_SHAPES = ("1024,256,64,32,1", "256,512,128,64,8", "1024,512,128,64,4")


def _strategy_variants(moe):
    """phases (GEMMs in MKL batched calls, and as a torch.mm loop), split on pool workers,
    and split on torch's OpenMP team (where there is one): its C++ pass (where it builds)
    and its Python loop."""
    from gatelab.bench.variants import Variant
    from gatelab.dispatch import gemm_batch, native
    from gatelab.dispatch.cpu_threads import forced_strategy, openmp_team

    forced = {"phases": ("phases", None), "phases mm-loop": ("phases", "loop")}
    forced["split pool"] = ("split", "pool")
    if openmp_team() is not None:
        forced["split team"] = ("split", "team")
        forced["split team python"] = ("split", "python")
    switches = {"loop": gemm_batch.disabled, "python": lambda: native.disabled("split")}
    variants = {}
    for label, (name, runner) in forced.items():

        def forward(x, name=name, runner=runner):
            off = switches.get(runner)
            with forced_strategy(name, "team" if runner == "python" else None if off else runner):
                with off() if off else contextlib.nullcontext():
                    return moe(x)

        variants[label] = Variant(forward, list(moe.parameters()))
    return variants


def note_strategies() -> None:
    from gatelab.bench.common import busy_processes
    from gatelab.bench.moe import measure
    from gatelab.bench.shapes import SWEEP_TRAINING, parse_shape
    from gatelab.bench.variants import build_gatelab_moe, dense_mlp
    from gatelab.dispatch.cpu_threads import cpu_strategy

    shapes = [*SWEEP_TRAINING, *(parse_shape(spec) for spec in SMALL_EXPERT_SHAPES)]
    print("5. fwd+bwd ratio dense / MoE (min of 5 round-robin): phases (MKL batched GEMMs),")
    print("   phases with a torch.mm loop, split on pool workers, split on the OpenMP team")
    print("   (its C++ pass, and its Python loop); and what cpu_strategy picks")
    for contended in (False, True):
        with busy_processes(int(contended)):
            for shape in shapes:
                torch.manual_seed(0)
                moe = build_gatelab_moe(shape, "cpu", torch.float32)
                variants = {"dense": dense_mlp(shape, "cpu", torch.float32)}
                variants.update(_strategy_variants(moe))
                x = torch.randn(shape.tokens, shape.dim, requires_grad=True)
                result = measure(variants, x, torch.randn_like(x), 1, 5, None)
                dense = result["dense"]["fwd_bwd_min_s"]
                ratios = "  ".join(
                    f"{name} {dense / result[name]['fwd_bwd_min_s']:.2f}"
                    for name in variants
                    if name != "dense"
                )
                with torch.no_grad():
                    counts = moe.router(x).experts.flatten().bincount(minlength=shape.num_experts)
                chosen = cpu_strategy(counts.tolist(), shape.dim, shape.hidden_dim)
                work = (
                    shape.tokens * shape.top_k // shape.num_experts * shape.dim * shape.hidden_dim
                )
                print(
                    f"   {'busy' if contended else 'idle'} {shape.spec:18s} "
                    f"{work / 2**20:6.1f}M/expert  {ratios}  (auto picks {chosen})"
                )


def _expert_gemms(
    rows: int, dim: int, hidden: int, experts: int, team: bool = False, batched: bool = False
):
    """The forward and backward GEMMs of ``experts`` experts of ``rows`` rows each, into
    reused outputs; with ``team``, the experts shared out over torch's OpenMP team (each
    GEMM single-threaded, as split runs them); with ``batched``, each of the six an MKL
    batched call over all experts (``gemm_batch``, as phases runs them)."""
    from gatelab.dispatch import gemm_batch
    from gatelab.dispatch.cpu_threads import openmp_team

    x, w_in = torch.randn(experts, rows, dim), torch.randn(experts, 2 * hidden, dim)
    act, w_out = torch.randn(experts, rows, hidden), torch.randn(experts, dim, hidden)
    h, y = torch.empty(experts, rows, 2 * hidden), torch.empty(experts, rows, dim)
    g_w_in, g_w_out = torch.empty_like(w_in), torch.empty_like(w_out)
    g_act, g_x = torch.empty(experts, rows, hidden), torch.empty_like(x)

    def one(e: int) -> None:
        torch.mm(x[e], w_in[e].t(), out=h[e])  # forward
        torch.mm(act[e], w_out[e].t(), out=y[e])
        torch.mm(y[e], w_out[e], out=g_act[e])  # backward: grad of act, of W_out, ...
        torch.mm(y[e].t(), act[e], out=g_w_out[e])
        torch.mm(h[e].t(), x[e], out=g_w_in[e])  # ... of W_in, of x
        torch.mm(h[e], w_in[e], out=g_x[e])

    def run():
        for e in range(experts):
            one(e)

    counts = torch.full((experts,), rows)
    flat = {name: t.view(experts * rows, -1) for name, t in (("x", x), ("act", act), ("h", h))}
    flat.update({name: t.view(experts * rows, -1) for name, t in (("y", y), ("g_act", g_act))})
    flat["g_x"] = g_x.view(experts * rows, -1)

    def run_batched():
        gemm_batch.linear(flat["x"], w_in, counts, flat["h"])
        gemm_batch.linear(flat["act"], w_out, counts, flat["y"])
        gemm_batch.linear(flat["y"], w_out.transpose(1, 2), counts, flat["g_act"])
        gemm_batch.weight_grad(flat["y"], flat["act"], counts, g_w_out)
        gemm_batch.weight_grad(flat["h"], flat["x"], counts, g_w_in)
        gemm_batch.linear(flat["h"], w_in.transpose(1, 2), counts, flat["g_x"])

    if batched:
        return run_batched

    def run_on_team():
        queue = iter(range(experts))

        def drain():
            for e in queue:
                one(e)

        openmp_team()(drain, torch.get_num_threads())

    return run_on_team if team else run


def _dense_gemms(tokens: int, dim: int, hidden: int):
    """The dense MLP's six GEMMs (forward and backward) of ``tokens`` rows."""
    return _expert_gemms(tokens, dim, hidden, 1)


def _alternating_ms(
    *fns, rounds: int = 9, warmup: int = 1, reverse: bool = False
) -> list[list[float]]:
    """``rounds`` timings (ms) of each, the calls alternating (load falls on all); with
    ``reverse`` their order flips every round (what runs first after the other's pass
    does not always pay for it)."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for round_ in range(rounds):
        order = list(zip(fns, times, strict=True))
        for fn, out in order[::-1] if reverse and round_ % 2 else order:
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1e3)
    return times


def _alternating_min_ms(*fns, rounds: int = 9) -> list[float]:
    """Fastest of ``rounds`` calls of each, the calls alternating (load falls on all)."""
    return [min(t) for t in _alternating_ms(*fns, rounds=rounds)]


def note_gemm_ceiling() -> None:
    from gatelab.bench.common import busy_processes
    from gatelab.bench.shapes import SWEEP_TRAINING
    from gatelab.dispatch.cpu_threads import openmp_team

    print("6. the six fwd+bwd GEMMs alone (fastest of 9, alternating): E experts of T*k/E")
    print("   rows each: two-thread torch.mm one expert after another (mm-loop), one MKL")
    print("   batched call per GEMM over all experts (batched, as phases runs them) and")
    print("   one-thread GEMMs side by side on the OpenMP team (split), against the dense")
    print("   MLP's; idle, then beside one busy process")
    arrangements = {"mm-loop": {}, "batched": {"batched": True}}
    if openmp_team() is not None:
        arrangements["split"] = {"team": True}
    for contended in (False, True):
        with busy_processes(int(contended)):
            for shape in SWEEP_TRAINING:
                t, d, f, e = shape.tokens, shape.dim, shape.hidden_dim, shape.num_experts
                rows = max(1, t * shape.top_k // e)
                fns = [_dense_gemms(t, d, shape.top_k * f)]
                fns += [_expert_gemms(rows, d, f, e, **how) for how in arrangements.values()]
                dense, *experts = _alternating_min_ms(*fns)
                ceilings = "  ".join(
                    f"{name} {ms:7.2f} ms ({dense / ms:.2f})"
                    for name, ms in zip(arrangements, experts, strict=True)
                )
                label = "busy" if contended else "idle"
                print(f"   {label} {shape.spec:18s} dense {dense:7.2f} ms  {ceilings}")


def _after_a_parallel_op_ms(op, repeats: int = 300) -> tuple[float, float]:
    """(median, mean) ms of ``op`` timed right after a two-thread bmm, as in a decode step."""
    w, x = torch.randn(512, 1024), torch.randn(1024, 1)
    blocks, col = w.view(8, -1, 1024), x.expand(8, -1, -1)
    times = []
    for _ in range(repeats):
        torch.bmm(blocks, col)
        start = time.perf_counter()
        op()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2] * 1e3, sum(times) / len(times) * 1e3


def note_decode_beside_a_busy_process() -> None:
    from gatelab.bench.common import busy_processes
    from gatelab.dispatch.grouped import _row_blocks

    print("7. decode ops right after a two-thread op, ms median / mean (the mean shows stalls)")
    w, x = torch.randn(2048, 512), torch.randn(1, 512)
    blocks = _row_blocks(2048)
    w_blocks, col = w.view(blocks, -1, 512), x.t().expand(blocks, -1, 1)
    rows, tokens = torch.randn(2, 512), torch.tensor([0, 0])

    def index_add():
        rows.new_zeros(2, 512).index_add_(0, tokens, rows)

    def index_add_one_thread():
        with _one_thread():
            index_add()

    def bmm_one_thread():
        with _one_thread():
            torch.bmm(w_blocks, col)

    ops = {
        "one row, bmm of W's row blocks": lambda: torch.bmm(w_blocks, col),
        "one row, the bmm on one thread": bmm_one_thread,
        "one row, GEMV": lambda: torch.mm(x, w.t()),
        "index_add_ of 2 rows": index_add,
        "index_add_ of 2 rows, one thread": index_add_one_thread,
    }
    for busy in (0, 1):
        with busy_processes(busy):
            for name, op in ops.items():
                median, mean = _after_a_parallel_op_ms(op)
                label = "busy" if busy else "idle"
                print(f"   {label} {name:34s} {median:6.3f} / {mean:6.3f}")


def note_decode_rows() -> None:
    from gatelab.bench.common import busy_processes
    from gatelab.dispatch import grouped_dispatch, native
    from gatelab.dispatch.cpu_threads import forced_strategy, openmp_team
    from gatelab.experts import GLU, ExpertWeights

    print("8. decode-sized calls, ms per layer (median of 15, round-robin; the layers'")
    print("   weights, ~300 MB, stream from memory): phases (C++ call), phases from")
    print("   Python (few-row kernel), phases from Python (MKL forms), split on the team")
    if openmp_team() is None:
        print("   (skipped: torch's parallel backend here is not OpenMP on libgomp)")
        return
    shapes = (
        (1, 512, 1024, 8, 2),
        (1, 512, 128, 64, 8),
        (8, 512, 1024, 8, 2),
        (16, 2048, 512, 64, 8),
    )
    for busy in (0, 1):
        with busy_processes(busy), torch.no_grad():
            for t, d, f, e, k in shapes:
                layers = max(1, 300 * 2**20 // (e * 3 * f * d * 4))
                banks = [
                    ExpertWeights(
                        torch.randn(e, 2 * f, d) * 0.05,
                        torch.randn(e, d, f) * 0.05,
                        None,
                        None,
                        GLU("silu"),
                    )
                    for _ in range(layers)
                ]
                x, weights = torch.randn(t, d), torch.softmax(torch.randn(t, k), -1)
                ids = [torch.stack([torch.randperm(e)[:k] for _ in range(t)]) for _ in banks]

                def call(variant, banks=banks, ids=ids, x=x, weights=weights):
                    strategy, _, off = variant.partition(" ")
                    parts = {"": None, "python": ("small",), "mkl": ("small", "rows")}[off]
                    with forced_strategy(strategy):
                        with native.disabled(*parts) if parts else contextlib.nullcontext():
                            for bank, experts in zip(banks, ids, strict=True):
                                grouped_dispatch(x, experts, weights, bank, deterministic=True)

                times = {"phases": [], "phases python": [], "phases mkl": [], "split": []}
                for name in times:
                    call(name)
                for _ in range(15):
                    for name, out in times.items():
                        start = time.perf_counter()
                        call(name)
                        out.append((time.perf_counter() - start) / layers * 1e3)
                label = "busy" if busy else "idle"
                rows = t * k / min(e, t * k)  # per active expert, at most
                medians = "  ".join(f"{n} {sorted(v)[7]:6.3f}" for n, v in times.items())
                print(f"   {label} {t},{d},{f},{e},{k} (~{rows:.1f} rows/expert)  {medians}")


# Training and inference shapes of 0.5 to 256 rows per expert, most with little work per
# expert (below the team's Python-loop threshold, 4M): where split in C++ starts to pay.
ROWS_SHAPES = {
    "train": (
        "256,256,64,128,2", "512,256,64,256,2", "256,512,128,256,4", "256,256,64,64,2",
        "512,512,256,128,2", "256,256,64,32,2", "256,512,128,64,4", "1024,256,64,32,1",
        "2048,256,64,128,4", "4096,256,64,64,2", "8192,256,128,64,2",
    ),
    "inference": (
        "4,512,128,64,8", "8,512,1024,8,2", "16,2048,512,64,8", "32,1024,256,64,8",
        "64,512,256,32,4", "128,512,1024,8,2",
    ),
}  # fmt: skip


def note_split_rows() -> None:
    from gatelab.bench.shapes import parse_shape
    from gatelab.bench.variants import build_gatelab_moe
    from gatelab.dispatch.cpu_threads import SPLIT_NATIVE_MIN, forced_strategy, openmp_team

    if openmp_team() is None:
        print("9. skipped: split's C++ pass runs on torch's OpenMP team, and there is none")
        return
    print("9. phases / split time (split's pass in C++ on the team), idle, median of 9")
    print(
        f"   alternating; cpu_threads.SPLIT_NATIVE_MIN (rows, multiply-adds) = {SPLIT_NATIVE_MIN}"
    )
    for mode, specs in ROWS_SHAPES.items():
        for spec in specs:
            shape = parse_shape(spec)
            torch.manual_seed(0)
            moe = build_gatelab_moe(shape, "cpu", torch.float32)
            x = torch.randn(shape.tokens, shape.dim, requires_grad=mode == "train")
            grad = torch.randn_like(x)

            def call(name, moe=moe, x=x, grad=grad, mode=mode):
                with forced_strategy(name):
                    if mode == "train":
                        moe(x).backward(grad)
                        x.grad = None
                        for p in moe.parameters():
                            p.grad = None
                        return
                    with torch.no_grad():
                        for _ in range(20):  # a decode step is a fraction of a millisecond
                            moe(x)

            phases, split = (
                statistics.median(t)
                for t in _alternating_ms(
                    lambda call=call: call("phases"),
                    lambda call=call: call("split"),
                    warmup=2,
                    reverse=True,
                )
            )
            rows = shape.tokens * shape.top_k / shape.num_experts
            work = rows * shape.dim * shape.hidden_dim / 2**20
            print(
                f"   {mode:9s} {spec:18s} {rows:6.1f} rows {work:6.2f}M/expert  "
                f"phases {phases:8.2f} ms  split {split:8.2f} ms  ratio {phases / split:.2f}"
            )


# Rows per expert and expert width F of top1-16, fine-128, fine-short and fine.
_EXPERT_SIZES = ((256, 128), (128, 64), (64, 256), (512, 256))


def note_glu_passes() -> None:
    from gatelab.experts.activation import GLU

    with _one_thread():
        for rows, ffn in _EXPERT_SIZES:
            forward, silu, backward, silu_back = _glu_passes_us(GLU("silu"), rows, ffn)
            print(
                f"10. [{rows:3d} rows, F {ffn:3d}] forward_into {forward:6.1f} us (silu alone "
                f"{silu:6.1f}), backward_into {backward:6.1f} us (silu_backward alone "
                f"{silu_back:6.1f}): at most {forward + backward - silu - silu_back:6.1f} us "
                "an expert for a fused kernel"
            )


def _glu_passes_us(glu, rows: int, ffn: int) -> tuple[float, float, float, float]:
    """One expert's forward_into, its SiLU alone, backward_into, its SiLU backward alone (us)."""
    hidden, scale = torch.randn(rows, 2 * ffn), torch.rand(rows, 1)
    act, kept, grad_hidden = torch.empty(rows, ffn), torch.empty(rows, ffn), hidden.clone()
    gate, grad = hidden[:, :ffn], torch.randn(rows, ffn)
    scratch = grad.clone()

    def backward():
        scratch.copy_(grad)  # backward_into may overwrite its grad
        glu.backward_into(hidden, scale, scratch, grad_hidden, kept)

    forward = _mean_us(lambda: glu.forward_into(hidden, scale, act, kept))
    silu = _mean_us(lambda: torch.ops.aten.silu.out(gate, out=kept))
    copy = _mean_us(lambda: scratch.copy_(grad))
    silu_back = _mean_us(
        lambda: torch.ops.aten.silu_backward.grad_input(grad, gate, grad_input=act)
    )
    return forward, silu, _mean_us(backward) - copy, silu_back


def _mean_us(fn, repeats: int = 2000) -> float:
    """Mean us of ``repeats`` back-to-back calls after 50 warm-up calls (one call is too
    short to time alone)."""
    for _ in range(50):
        fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats * 1e6


@contextlib.contextmanager
def _one_thread():
    """torch on one thread (as split's workers run an expert), its count restored after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def note_router_selection() -> None:
    # [T, E] and k of the routers of top1-16, fine-short, fine-128, fine and mid-32.
    for tokens, experts, k in ((4096, 16, 1), (512, 64, 8), (2048, 128, 8), (4096, 64, 8),
                               (2048, 32, 4)):  # fmt: skip
        old, new = _alternating_ms(*_router_selections(tokens, experts, k), rounds=201)
        print(
            f"11. router [{tokens}, {experts}] k {k}: softmax, top-k, renormalise "
            f"{statistics.median(old):.3f} ms, softmax of the chosen logits "
            f"{statistics.median(new):.3f} ms (fwd+bwd)"
        )


def _router_selections(tokens: int, experts: int, k: int):
    """Two ways to the same renormalised top-k weights, each run forward and backward."""
    from gatelab.routing.routers import top_k  # torch.max at k = 1, else torch.topk

    logits, grad = torch.randn(tokens, experts), torch.randn(tokens, k)

    def renormalised():
        chosen = logits.clone().requires_grad_()
        probs, _ = top_k(chosen.softmax(-1), k)
        (probs / probs.sum(-1, keepdim=True).clamp_min(1e-20)).backward(grad)

    def chosen_softmax():
        chosen = logits.clone().requires_grad_()
        chosen.softmax(-1)  # the Routing's scores; outside the weights' graph
        top_k(chosen, k)[0].softmax(-1).backward(grad)

    return renormalised, chosen_softmax


def note_router_input_grad() -> None:
    from gatelab.bench.moe import measure
    from gatelab.bench.shapes import parse_shape

    for spec in ("top1-16=4096,256,128,16,1", "fine-short=512,512,256,64,8"):
        shape = parse_shape(spec)
        variants = _router_input_variants(shape)
        x = torch.randn(shape.tokens, shape.dim, requires_grad=True)
        result = measure(variants, x, torch.randn_like(x), 2, 21, None)
        ms = {name: result[name]["fwd_bwd_s"] * 1e3 for name in variants}
        print(
            f"12. {shape.name}: fwd+bwd dense {ms['dense']:.2f} ms, MoE {ms['moe']:.2f} ms, "
            f"MoE with the router's input detached {ms['detached']:.2f} ms (medians of 21)"
        )


def _router_input_variants(shape) -> dict:
    """The dense MLP, the MoE layer, and the same layer whose router sees x detached."""
    from gatelab.bench.variants import Variant, build_gatelab_moe, dense_mlp

    torch.manual_seed(0)
    moe = build_gatelab_moe(shape, "cpu", torch.float32)
    detach = [False]
    moe.router.register_forward_pre_hook(
        lambda module, args: (args[0].detach(), *args[1:]) if detach[0] else None
    )

    def detached(x):
        detach[0] = True
        try:
            return moe(x)
        finally:
            detach[0] = False

    params = list(moe.parameters())
    return {
        "dense": dense_mlp(shape, "cpu", torch.float32),
        "moe": Variant(moe, params),
        "detached": Variant(detached, params),
    }


NOTES = {
    1: note_fresh_output,
    2: note_fresh_weight_grad,
    3: note_few_rows,
    4: note_gemm_efficiency,
    5: note_strategies,
    6: note_gemm_ceiling,
    7: note_decode_beside_a_busy_process,
    8: note_decode_rows,
    9: note_split_rows,
    10: note_glu_passes,
    11: note_router_selection,
    12: note_router_input_grad,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", type=int, choices=sorted(NOTES), nargs="+")
    args = parser.parse_args()
    torch.manual_seed(0)
    for number in args.only or sorted(NOTES):
        NOTES[number]()


if __name__ == "__main__":
    main()
