"""The grouped dispatcher: sort slots by expert, one grouped GEMM per projection, combine.

``torch.nn.functional.grouped_mm`` runs each projection for all experts in one call where
the running torch has a kernel for the dtype, device and alignment; on CPU MKL's batched
GEMM does (``gemm_batch.py``), and elsewhere (float64 on GPUs, odd widths, old torch) a
loop of plain matmuls over the same sorted rows gives the same result.

The experts run inside one autograd Function, :class:`GroupedExperts`, so that forward and
backward touch each [slots, width] tensor as few times as possible:

- the routing weight is folded into the activation (``w * act(h)``) instead of scaling
  the [slots, D] output, and the combine is one ``index_add_`` into [T, D];
- backward recomputes the activation from the saved pre-activation (one elementwise pass)
  instead of keeping it, and writes weight gradients with grouped GEMMs straight into
  [E, ...] tensors: no per-token copy of any weight, no per-expert dense gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from ..experts.activation import as_activation
from ..experts.bank import ExpertWeights
from . import gemm_batch, native
from .checks import check_dispatch_inputs
from .cpu_threads import cpu_strategy, run_split, split_runner
from .grouped_mm import _GROUPED_MM, grouped_mm_op, grouped_mm_supported
from .workspace import gradient_buffer, saved_buffer, scratch


def _use_kernel(a: Tensor, b: Tensor) -> bool:
    # On CPU torch's kernel is itself a loop of GEMMs but cannot write into a reused
    # buffer, so the loop below is as fast and allocates less (under torch.compile the
    # callers take grouped_mm_op instead, which has no data-dependent Python).
    return grouped_mm_supported(a, b) and a.device.type != "cpu"


def grouped_linear(
    x: Tensor,
    w: Tensor,
    counts: Tensor,
    offsets: Tensor,
    out: Tensor | None = None,
    kernel: bool | None = None,
) -> Tensor:
    """Rows of x [N, in], sorted by expert, times w[e].T for w [E, out, in] -> [N, out].

    Writes into ``out`` [N, out] when given and the loop path runs. ``kernel`` forces
    torch's grouped GEMM (True) or the loop (False); None picks as described above.
    """
    w_t = w.transpose(1, 2)
    if kernel is None and torch.compiler.is_compiling():
        return grouped_mm_op(x, w_t, offsets)
    if _use_kernel(x, w_t) if kernel is None else kernel:
        return _GROUPED_MM(x, w_t, offs=offsets)
    out = x.new_empty(x.shape[0], w.shape[1]) if out is None else out
    host_counts = counts.tolist()
    # Experts of at most `few` rows in one call of the C++ few-row kernel (native.py),
    # those of gemm_batch.MIN_ROWS rows or more in one MKL call where it runs; the loop
    # below takes the rest.
    few = native.ROWS_MAX if native.rows_fit(x, w, out) else 0
    if few:
        _few_rows_linear(x, w, host_counts, out, few)
    many = max(host_counts, default=0) >= gemm_batch.MIN_ROWS
    batched = many and gemm_batch.linear(x, w, counts, out)
    one_row = _one_row_products(x, w, out) if not few and 1 in host_counts else None
    start = 0
    for e, count in enumerate(host_counts):
        if count <= few or (batched and count >= gemm_batch.MIN_ROWS):
            pass
        elif count == 1 and one_row is not None:  # decode: most experts get one row
            one_row(e, start)
        elif count:
            rows = slice(start, start + count)
            _rows_linear(x[rows], w[e], out[rows])
        start += count
    return out


def _few_rows_linear(x: Tensor, w: Tensor, counts: list[int], out: Tensor, few: int) -> None:
    """The experts of 1 to ``few`` rows in one ``native.rows_linear`` call on every thread."""
    experts, starts, sizes = few_row_experts(counts, few)
    if experts:
        native.rows_linear(x, w, experts, starts, sizes, out, torch.get_num_threads())


def few_row_experts(counts: list[int], few: int) -> tuple[list[int], list[int], list[int]]:
    """(experts, their first rows, their row counts) of the experts holding 1 to ``few``
    of the expert-sorted rows that ``counts`` [E] describes."""
    experts, starts, sizes, start = [], [], [], 0
    for e, count in enumerate(counts):
        if 0 < count <= few:
            experts.append(e)
            starts.append(start)
            sizes.append(count)
        start += count
    return experts, starts, sizes


# Without the C++ build (native.py; with it, experts of up to native.ROWS_MAX rows take
# its few-row kernel instead), the forms below. How MKL reads one expert's row-major
# weight W [out, in] for c rows x (benchmarks/cpu_notes.py, note 3, 2 cores): with 2 to 4
# rows, W @ x.T streams W from memory at up to 2.5x the speed of x @ W.T; from 6 rows the
# two are equal or x @ W.T wins. W @ x.T must see x as a transposed row-major matrix: a
# column-major x (x.T made contiguous, or an expanded row) runs 3-5x slower. One row is a
# matrix-vector product, and MKL's GEMV runs on one thread at 12-14 GB/s from memory; cut
# into row blocks of W and run as one bmm, the blocks run on every thread: 2-3x faster
# from memory (a decode step through a multi-layer model) and as fast as the GEMV in
# cache. Each row's dot product is the same on any thread or block count (MKL's GEMV
# gives other bits).
_FEW_ROWS = (1, 4)


def _rows_linear(x: Tensor, w: Tensor, out: Tensor, few: int = 0) -> Tensor:
    """out [c, out] = x [c, in] @ w.T for one expert's w [out, in]; up to ``few`` rows
    by the C++ few-row kernel on this thread (the caller checked ``native.rows_fit``)."""
    rows = x.shape[0]
    if 0 < rows <= few:
        native.rows_linear(x, w.unsqueeze(0), [0], [0], [rows], out, 1)
        return out
    one_row = _one_row_products(x, w.unsqueeze(0), out) if rows == 1 else None
    if one_row is not None:
        one_row(0, 0)
        return out
    if _FEW_ROWS[0] <= rows <= _FEW_ROWS[1] and w.stride(1) == 1:
        if rows == 1:  # W's rows do not divide into blocks: a GEMM on a duplicated row
            return out.copy_(torch.mm(w, torch.cat([x, x]).t())[:, :1].t())
        return out.copy_(torch.mm(w, x.t()).t())
    return torch.mm(x, w.t(), out=out)


def _one_row_products(x: Tensor, w: Tensor, out: Tensor) -> Callable[[int, int], None] | None:
    """``product(e, r)``: out[r] = x[r] @ w[e].T for w [E, out, in], as one bmm over row
    blocks of w[e] (see ``_FEW_ROWS``); None where the layout cannot be viewed so.

    The views are made once per call, so each product is three small ops and the bmm (a
    decode step runs up to k of them per projection and layer).
    """
    blocks = _row_blocks(w.shape[1])
    if not blocks or not (w.is_contiguous() and out.is_contiguous() and x.stride(1) == 1):
        return None
    in_dim = w.shape[2]
    w_blocks = w.view(w.shape[0], blocks, -1, in_dim)  # [E, blocks, out / blocks, in]
    out_blocks = out.view(out.shape[0], blocks, -1, 1)  # [N, blocks, out / blocks, 1]
    # Row r as [blocks, in, 1] (the same row for every block) with the strides of a
    # transposed row-major matrix: with a unit stride on the last dim bmm copies it, 10x slower.
    col_shape, col_strides = (blocks, in_dim, 1), (0, 1, in_dim)

    def product(e: int, r: int) -> None:
        col = x.as_strided(col_shape, col_strides, x.storage_offset() + r * x.stride(0))
        torch.bmm(w_blocks[e], col, out=out_blocks[r])

    return product


def _row_blocks(out_dim: int) -> int:
    """How many row blocks a one-row product splits W into: 4 per intra-op thread (note 3:
    2 to 16 blocks on 2 threads are within noise of each other; more than one per thread
    evens out a descheduled thread), fewer if that does not divide ``out_dim``; 0 for none."""
    threads = torch.get_num_threads()
    for blocks in (4 * threads, 2 * threads, threads):
        if blocks > 1 and out_dim % blocks == 0:
            return blocks
    return 0


def grouped_weight_grad(
    grad: Tensor,
    inp: Tensor,
    counts: Tensor,
    offsets: Tensor,
    kernel: bool | None = None,
    weight: Tensor | None = None,
) -> Tensor:
    """Per-expert grad[e].T @ inp[e] for rows sorted by expert -> [E, out, in]; on CPU
    into ``weight``'s reused gradient buffer (``workspace.gradient_buffer``) if given."""
    grad_t = grad.t()
    if kernel is None and torch.compiler.is_compiling():
        return grouped_mm_op(grad_t, inp, offsets)
    if _use_kernel(grad_t, inp) if kernel is None else kernel:
        return _GROUPED_MM(grad_t, inp, offs=offsets)
    shape = (counts.shape[0], grad.shape[1], inp.shape[1])
    out = grad.new_empty(shape) if weight is None else gradient_buffer(weight, shape)
    host_counts = counts.tolist()
    many = max(host_counts, default=0) >= gemm_batch.MIN_ROWS
    batched = many and gemm_batch.weight_grad(grad, inp, counts, out)
    start = 0
    for e, count in enumerate(host_counts):
        rows = slice(start, start + count)
        start += count
        if batched and count >= gemm_batch.MIN_ROWS:
            continue  # written by the batched call
        if count:
            torch.mm(grad_t[:, rows], inp[rows], out=out[e])
        else:
            out[e].zero_()
    return out


def _segment_sum(rows: Tensor, counts: Tensor) -> Tensor:
    """Sum of each expert's rows (rows sorted by expert) -> [E, width], without atomics."""
    return torch.segment_reduce(rows, "sum", lengths=counts, axis=0, unsafe=True)


def _gather(x: Tensor, tokens: Tensor, out: Tensor) -> Tensor:
    return torch.index_select(x.to(out.dtype), 0, tokens, out=out)


class GroupedExperts(torch.autograd.Function):
    """out[t] = sum over t's slots of w * (W_out act(W_in x_t + b_in) + b_out).

    ``routed`` comes from :func:`sort_slots`: the routed slots in expert order with their
    tokens and experts [N], ``counts`` [E] and int32 ``offsets`` [E]; ``slot_weights`` [N]
    follows the same order and ``shape`` is the routing's (T, K).

    What backward needs (gathered rows, pre-activation, activation) is kept in pooled
    buffers that return to the pool when this node is freed; temporaries live in scratch
    buffers (see ``workspace.py``). Backward only reads what forward saved, so a graph
    kept with ``retain_graph=True`` can be differentiated again.

    On CPU each pass runs one of two strategies (``cpu_threads.cpu_strategy``): phase by
    phase over all experts with multi-threaded ops, or split, each expert's whole pass on
    one single-threaded worker. Both write the same buffers.

    Backward reads ``ctx.saved_tensors`` once (activation checkpointing with
    ``use_reentrant=False`` allows one unpack per saved tensor). Under ``create_graph=True``
    (grad mode on in backward) it differentiates :func:`composite_experts`, the same
    function in differentiable torch ops, so double backward works.
    """

    @staticmethod
    def forward(
        ctx, x, slot_weights, w_in, w_out, b_in, b_out, activation, routed, shape, deterministic
    ):
        out, saved = _forward(ctx, x, slot_weights, w_in, w_out, b_in, b_out, activation, routed)
        ctx.save_for_backward(*saved)
        ctx.activation, ctx.has_b_in = activation, b_in is not None
        ctx.shape, ctx.deterministic = shape, deterministic
        return _combine_out(out, routed, shape, deterministic).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # once: a checkpointed graph unpacks each tensor once
        if torch.is_grad_enabled():  # create_graph=True: a differentiable backward
            x, b_in, _, _, _, _, slot_weights, w_in, w_out, b_out, *routed = saved
            inputs = (x, slot_weights, w_in, w_out, b_in, b_out)
            grads = composite_backward(ctx, inputs, ctx.activation, tuple(routed), grad_out)
            return (*grads, None, None, None, None)
        return GroupedExperts._backward(ctx, saved, grad_out)

    @staticmethod
    def _backward(ctx, saved, grad_out):
        x, _, xs, hidden, act, kept, slot_weights, w_in, w_out, b_out = saved[:10]
        routed = saved[10:]
        tokens, counts, valid = routed[1], routed[3], routed[5]
        need_x, need_scale = ctx.needs_input_grad[:2]
        rows, ffn = tokens.shape[0], w_out.shape[2]
        scale = slot_weights.to(hidden.dtype).unsqueeze(1)
        buffers = (
            scratch("rows_out", (rows, x.shape[1]), w_out),  # gy, then d loss / d xs
            scratch("act", (rows, ffn), hidden),
            scratch("g_hidden", hidden.shape, hidden),
        )
        split = _strategy(x, counts, w_out, ctx.activation) == "split"
        run = _split_backward if split else _phases_backward
        inputs = (x, xs, hidden, act, kept, scale, w_in, w_out, b_out)
        g_x, g_scale, g_w_in, g_w_out, g_b_in, g_b_out = run(ctx, inputs, routed, grad_out, buffers)
        if need_x:
            g_x = _combine_out(g_x, routed, ctx.shape, ctx.deterministic).to(x.dtype)
        # Padding rows computed on unwritten rows: their weights get no gradient (on CPU
        # outside torch.compile the host knows whether there are any).
        if need_scale and (not _host_side(x) or _routed_rows(routed) < rows):
            g_scale = torch.where(valid, g_scale, 0)
        g_scale = g_scale.to(slot_weights.dtype) if need_scale else None
        return g_x, g_scale, g_w_in, g_w_out, g_b_in, g_b_out, None, None, None, None


class _NoGrad:
    """The ``ctx`` of an inference call: nothing needs a gradient, nothing is saved."""

    needs_input_grad = (False,) * 10

    def __init__(self):
        self.leases = []


def _strategy(x: Tensor, counts: Tensor, w_out: Tensor, activation) -> str:
    if not _host_side(x):
        return "phases"
    return _cpu_strategy(counts.tolist(), w_out, activation)


def _cpu_strategy(counts: list[int], w_out: Tensor, activation) -> str:
    """``cpu_strategy`` for these experts; split's passes run in C++ where both of them
    would (``_split_in_cpp`` without the few-row kernel: what backward asks)."""
    native = _split_in_cpp(activation, counts)
    return cpu_strategy(counts, w_out.shape[1], w_out.shape[2], native=native)


def _forward(ctx, x, slot_weights, w_in, w_out, b_in, b_out, activation, routed):
    """The experts' weighted outputs [N, D] in sorted-row order, and what backward needs."""
    tokens, counts = routed[1], routed[3]
    rows, ffn = tokens.shape[0], w_out.shape[2]
    need_w_in, need_w_out = ctx.needs_input_grad[2:4]
    training = any(ctx.needs_input_grad)
    ctx.leases = []

    def buffer(name: str, shape: tuple[int, ...], keep: bool) -> Tensor:
        if not keep:
            return scratch(name, shape, w_in)
        tensor, lease = saved_buffer(shape, w_in)
        ctx.leases.append(lease)
        return tensor

    xs = buffer("rows_in", (rows, x.shape[1]), need_w_in)
    hidden = buffer("hidden", (rows, w_in.shape[1]), training)
    kept = buffer("kept", (rows, ffn), training)
    act = buffer("act", (rows, ffn), need_w_out)
    y = scratch("rows_out", xs.shape, w_in)
    scale = slot_weights.to(hidden.dtype).unsqueeze(1)
    split = _strategy(x, counts, w_out, activation) == "split"
    run = _split_forward if split else _phases_forward
    hidden, act, y = run(
        (x, w_in, w_out, b_in, b_out, activation, scale), routed, (xs, hidden, act, kept, y)
    )
    saved = (x, b_in, xs, hidden, act, kept, slot_weights, w_in, w_out, b_out, *routed)
    return y, saved


def _phases_forward(inputs, routed, buffers) -> tuple[Tensor, Tensor, Tensor]:
    """The forward phase by phase over all experts; returns (hidden, act, y), which are
    the buffers given except where torch's grouped GEMM (CUDA) returns new tensors."""
    x, w_in, w_out, b_in, b_out, activation, scale = inputs
    _, tokens, experts, counts, offsets, _ = routed
    xs, hidden, act, kept, y = buffers
    _gather(x, tokens, xs)
    hidden = grouped_linear(xs, w_in, counts, offsets, out=hidden)
    if b_in is not None:
        hidden += b_in[experts]
    act = activation.forward_into(hidden, scale, act, kept)
    y = grouped_linear(act, w_out, counts, offsets, out=y)
    if b_out is not None:
        y.addcmul_(scale, b_out[experts])
    return hidden, act, y


def _split_forward(inputs, routed, buffers) -> tuple[Tensor, Tensor, Tensor]:
    """Each expert's whole forward on one single-threaded worker, into ``buffers``."""
    x, w_in, w_out, b_in, b_out, activation, scale = inputs
    tokens, counts = routed[1], routed[3]
    xs, hidden, act, kept, y = buffers
    x = x.to(w_in.dtype)
    host_counts = counts.tolist()
    few = split_few_rows(xs, w_in, hidden, act, w_out, y)
    in_cpp = _native_split(activation, host_counts, few)
    if in_cpp is not None:
        order, kind, glu, workers = in_cpp
        native.forward(
            x, tokens, host_counts, order, w_in, w_out, b_in, b_out, scale, *buffers,
            kind, glu, few, workers,
        )  # fmt: skip
        return hidden, act, y
    # Each expert's rows of every buffer, cut in one call per buffer: a slice per expert
    # and buffer from Python costs about as much as a small expert's elementwise op, and
    # the workers' Python runs one at a time (the GIL).
    rows = _per_expert_rows(host_counts, (tokens, xs, hidden, act, kept, y, scale))
    w_in_e, w_out_e = w_in.unbind(), w_out.unbind()

    def expert(e: int, start: int, count: int) -> None:
        tokens_e, xs_e, hidden_e, act_e, kept_e, y_e, scale_e = rows[e]
        torch.index_select(x, 0, tokens_e, out=xs_e)
        _rows_linear(xs_e, w_in_e[e], hidden_e, few)
        if b_in is not None:
            hidden_e += b_in[e]
        act_r = activation.forward_into(hidden_e, scale_e, act_e, kept_e)
        if act_r.data_ptr() != act_e.data_ptr():  # an activation that returns a new tensor
            act_e.copy_(act_r)
        _rows_linear(act_e, w_out_e[e], y_e, few)
        if b_out is not None:
            y_e.addcmul_(scale_e, b_out[e])

    run_split(expert, host_counts)
    return hidden, act, y


def split_few_rows(xs, w_in, hidden, act, w_out, y) -> int:
    """Up to how many rows split's forward runs an expert's two products with the C++
    few-row kernel (``native.ROWS_MAX`` where both take it, else 0): the kernel
    phase-wise runs on such experts (``grouped_linear``), so the strategies keep the
    same bits."""
    fits = native.rows_fit(xs, w_in, hidden) and native.rows_fit(act, w_out, y)
    return native.ROWS_MAX if fits else 0


def _native_split(
    activation, counts: list[int], few: int = 0
) -> tuple[list[int], int, bool, int] | None:
    """(experts largest first, activation index, glu, workers) where split's pass runs
    in C++ (``native.py``), else None: it needs the build, torch's OpenMP team and one of
    the named activations. Experts of up to ``few`` rows take the C++ few-row kernel;
    without it (``few`` 0) every expert needs more than ``_FEW_ROWS`` rows, since the
    few-row forms of ``_rows_linear`` are Python's alone."""
    if not _split_in_cpp(activation, counts, few):
        return None
    order = sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e])
    return order, *native.activation_index(activation), min(torch.get_num_threads(), len(order))


def _split_in_cpp(activation, counts: list[int], few: int = 0) -> bool:
    """Whether :func:`_native_split` runs split's pass in C++ (cheap: a decode step asks
    the strategy rule, and so this, on every call)."""
    if native.activation_index(activation) is None or not any(counts):
        return False
    if not few and any(0 < c <= _FEW_ROWS[1] for c in counts):
        return False
    return split_runner() == "team" and native.available()


def _per_expert_rows(counts: list[int], tensors) -> list[tuple[Tensor, ...]]:
    """For each expert, its rows of each of ``tensors`` (rows sorted by expert; padding
    rows after the routed ones are left out)."""
    sizes = [*counts, tensors[0].shape[0] - sum(counts)]
    return list(zip(*(t.split(sizes) for t in tensors), strict=True))


def _phases_backward(ctx, saved, routed, grad_out, buffers):
    """Backward phase by phase over all experts (multi-threaded ops, grouped GEMMs).

    Returns what :func:`_split_backward` returns.
    """
    _, xs, hidden, act, kept, scale, w_in, w_out, b_out = saved
    _, tokens, experts, counts, offsets, _ = routed
    gy, g_act, g_hidden = buffers
    need_x, _, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
    _gather(grad_out, tokens, gy)
    g_w_out = g_b_out = g_w_in = g_b_in = g_xs = None
    if need_w_out:
        g_w_out = grouped_weight_grad(gy, act, counts, offsets, weight=w_out)
    if need_b_out:
        g_b_out = _segment_sum(gy * scale, counts)
    g_act = grouped_linear(gy, w_out.transpose(1, 2), counts, offsets, out=g_act)
    g_scale = ctx.activation.backward_into(hidden, scale, g_act, g_hidden, kept)
    if b_out is not None:
        g_scale += (gy * b_out[experts]).sum(dim=1)
    if need_w_in:
        g_w_in = grouped_weight_grad(g_hidden, xs, counts, offsets, weight=w_in)
    if need_b_in:
        g_b_in = _segment_sum(g_hidden, counts)
    if need_x:  # into gy's buffer: gy is no longer needed
        g_xs = grouped_linear(g_hidden, w_in.transpose(1, 2), counts, offsets, out=gy)
    return g_xs, g_scale, g_w_in, g_w_out, g_b_in, g_b_out


def _split_backward(ctx, saved, routed, grad_out, buffers):
    """Each expert's whole backward on one single-threaded worker.

    Returns (g_xs [N, D] in sorted-row order, g_scale [N], g_w_in, g_w_out, g_b_in,
    g_b_out), None where ``ctx`` needs no gradient; rows of idle experts' weight and bias
    gradients are zero.
    """
    _, xs, hidden, act, kept, scale, w_in, w_out, b_out = saved
    tokens, counts = routed[1], routed[3]
    gy, g_act, g_hidden = buffers
    need_x, _, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
    host_counts = counts.tolist()
    idle = [e for e, c in enumerate(host_counts) if not c]
    num_experts = len(host_counts)
    g_w_in = gradient_buffer(w_in) if need_w_in else None
    g_w_out = gradient_buffer(w_out) if need_w_out else None
    g_b_in = w_in.new_empty(num_experts, hidden.shape[1]) if need_b_in else None
    g_b_out = w_in.new_empty(num_experts, w_out.shape[1]) if need_b_out else None
    grads = (g_w_in, g_w_out, g_b_in, g_b_out)
    for grad in grads:
        if grad is not None:
            grad[idle] = 0  # no worker writes the idle experts' rows
    g_scale = scale.new_empty(scale.shape[0])
    grad_out = grad_out.to(gy.dtype)
    activation = ctx.activation
    in_cpp = _native_split(activation, host_counts)
    if in_cpp is not None:
        order, kind, glu, workers = in_cpp
        native.backward(
            grad_out, tokens, host_counts, order, counts, xs, hidden, act, kept, scale,
            w_in, w_out, b_out, gy, g_act, g_hidden, g_scale, *grads, need_x, kind, glu,
            workers,
        )  # fmt: skip
        return gy if need_x else None, g_scale, *grads
    rows = _per_expert_rows(
        host_counts, (tokens, gy, xs, hidden, act, kept, scale, g_act, g_hidden, g_scale)
    )
    w_in_t, w_out_t = w_in.transpose(1, 2).unbind(), w_out.transpose(1, 2).unbind()
    grads_e = [None if g is None else g.unbind() for g in grads]
    counts_e = counts.split(1)

    def expert(e: int, start: int, count: int) -> None:
        tokens_e, gy_e, xs_e, hidden_e, act_e, kept_e, scale_e, g_act_e, g_hidden_e, g_scale_e = (
            rows[e]
        )
        g_w_in_e, g_w_out_e, g_b_in_e, g_b_out_e = (None if g is None else g[e] for g in grads_e)
        torch.index_select(grad_out, 0, tokens_e, out=gy_e)
        if g_w_out_e is not None:
            torch.mm(gy_e.t(), act_e, out=g_w_out_e)
        # The bias terms use the phase-wise path's ops on this expert's rows (segment sums,
        # a row-wise sum), so the two strategies give the same bits.
        if g_b_out_e is not None:
            g_b_out_e.copy_(_segment_sum(gy_e * scale_e, counts_e[e])[0])
        _rows_linear(gy_e, w_out_t[e], g_act_e)
        g_scale_e.copy_(activation.backward_into(hidden_e, scale_e, g_act_e, g_hidden_e, kept_e))
        if b_out is not None:
            g_scale_e += (gy_e * b_out[e]).sum(dim=1)
        if g_w_in_e is not None:
            torch.mm(g_hidden_e.t(), xs_e, out=g_w_in_e)
        if g_b_in_e is not None:
            g_b_in_e.copy_(_segment_sum(g_hidden_e, counts_e[e])[0])
        if need_x:  # into gy's rows: this expert's gy is no longer needed
            _rows_linear(g_hidden_e, w_in_t[e], gy_e)

    run_split(expert, host_counts)
    return gy if need_x else None, g_scale, g_w_in, g_w_out, g_b_in, g_b_out


def composite_experts(inputs, activation, routed, shape) -> Tensor:
    """What GroupedExperts computes, in plain differentiable torch ops (slower): the path
    double backward differentiates. ``inputs`` = (x, slot_weights, w_in, w_out, b_in, b_out)."""
    x, slot_weights, w_in, w_out, b_in, b_out = inputs
    # The routed rows come first (sort_slots' padding rows follow): this slow path reads
    # their number on the host.
    counts = routed[3]
    routed_rows = int(counts.sum())
    tokens, slot_weights = routed[1][:routed_rows], slot_weights[:routed_rows]
    xs = x[tokens].to(w_in.dtype)
    outs, start = [], 0
    for e, count in enumerate(counts.tolist()):
        if count:
            rows = xs[start : start + count]
            hidden = F.linear(rows, w_in[e], None if b_in is None else b_in[e])
            outs.append(F.linear(activation(hidden), w_out[e], None if b_out is None else b_out[e]))
        start += count
    y = torch.cat(outs) if outs else xs.new_zeros(0, w_out.shape[1])
    y = y * slot_weights.to(y.dtype).unsqueeze(1)
    return y.new_zeros(shape[0], y.shape[1]).index_add(0, tokens, y).to(x.dtype)


def composite_backward(ctx, inputs, activation, routed, grad_out) -> list:
    """Gradients of :func:`composite_experts` for the inputs ``ctx`` needs, with a graph."""
    wanted = [i for i, t in enumerate(inputs) if ctx.needs_input_grad[i] and t is not None]
    out = composite_experts(inputs, activation, routed, ctx.shape)
    found = torch.autograd.grad(
        out, [inputs[i] for i in wanted], grad_out, create_graph=True, allow_unused=True
    )
    grads = [None] * len(inputs)
    for i, g in zip(wanted, found, strict=True):
        grads[i] = torch.zeros_like(inputs[i]) if g is None else g
    return grads


def combine(
    y: Tensor, slots: Tensor, tokens: Tensor, shape: tuple[int, int], deterministic: bool
) -> Tensor:
    """Sum each routed slot's weighted expert output into its token's row of [T, D].

    ``slots`` are the routed slots' flat ids in the [T, K] routing, ``shape`` is (T, K).
    A slot id T*K (token id T) is a padding row: it lands in a spare row that is dropped,
    so the fixed-size rows of :func:`sort_slots` need no mask and no host-sized slice.
    """
    num_tokens, num_slots = shape
    if deterministic and y.device.type != "cpu":
        # CUDA's index_add_ accumulates with atomics; put the rows back in slot order and
        # sum over k instead, which gives the same bits every run.
        by_slot = y.new_zeros(num_tokens * num_slots + 1, y.shape[1]).index_copy_(0, slots, y)
        return by_slot[:-1].view(num_tokens, num_slots, -1).sum(dim=1)
    # On CPU index_add_ walks the rows in order, so it is deterministic already.
    return y.new_zeros(num_tokens + 1, y.shape[1]).index_add_(0, tokens, y)[:-1]


def _combine_out(y: Tensor, routed, shape: tuple[int, int], deterministic: bool) -> Tensor:
    """:func:`combine` of the sorted rows ``y`` into [T, D]; on CPU outside torch.compile
    :func:`_combine_routed`, which gives the same sums."""
    if _host_side(y):
        return _combine_routed(y, routed, shape)
    return combine(y, *padded_targets(routed, shape), shape, deterministic)


def _host_side(t: Tensor) -> bool:
    """Whether the dispatcher may read sizes on the host here: CPU, not under torch.compile."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _routed_rows(routed) -> int:
    """How many of :func:`sort_slots`' rows are routed (read on the host)."""
    offsets = routed[4]
    return int(offsets[-1]) if offsets.numel() else 0


def _combine_routed(y: Tensor, routed, shape: tuple[int, int]) -> Tensor:
    """:func:`combine` on CPU of the routed rows alone (read on the host), into a [T, D]
    tensor that is not a view: no ``torch.where`` over the slots to send padding rows
    to a dropped row, and in backward autograd then adds the router's gradient of the
    layer input into it in place, instead of into a new [T, D] tensor (1.2 ms of a 26 ms
    step at 4096,256,128,16,1, mostly the new tensor's first-touch page faults). Each
    row's sum runs in the same order as combine's, so the bits are the same.

    With one slot per token and every token routed, each token's sum is its one row, so
    the combine is a gather of the rows in token order: no zero fill and no scatter
    (0.06 against 0.11 ms at [4096, 256]). Its values are combine's (0 + v = v; only
    a -0.0 keeps its sign)."""
    num_tokens, num_slots = shape
    rows = _routed_rows(routed)
    tokens = routed[1][:rows]
    if num_slots == 1 and rows == num_tokens:
        row_of_token = torch.empty_like(tokens).index_copy_(
            0, tokens, torch.arange(rows, device=tokens.device)
        )
        return y.index_select(0, row_of_token)
    return y.new_zeros(num_tokens, y.shape[1]).index_add_(0, tokens, y[:rows])


def sort_slots(
    experts: Tensor, num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """All T*K slots of [T, K] ``experts`` in expert order (stable), routed slots first.

    Returns (slots, tokens, experts, counts, offsets, valid): flat slot ids, their tokens
    and experts [T*K], slots per expert [E], the int32 end offsets grouped GEMMs take and
    which rows are routed [T*K]. Every shape is fixed by (T, K, E) and nothing is read on
    the host, so the device path never synchronises and ``torch.compile`` traces one
    graph: the rows past ``offsets[-1]`` (empty slots, and any id outside 0..E-1 that
    reached here unchecked under torch.compile) are padding. Their ``experts`` are
    clamped to a real expert (so bias gathers stay in range) and :func:`padded_targets`
    sends their outputs to a dropped row.

    On CPU outside ``torch.compile`` the C++ build gives the same tensors from a counting
    sort (``native.sort_slots``): 0.025-0.13 ms against 0.16-1.05 ms for these ops at
    4K-32K slots (docs/benchmarks.md, "CPU strategies").
    """
    if not torch.compiler.is_compiling() and native.sort_fits(experts):
        return native.sort_slots(experts, num_experts)
    num_slots = experts.shape[1]
    key = experts.reshape(-1)
    key = torch.where((key < 0) | (key >= num_experts), num_experts, key)
    slots = torch.argsort(key, stable=True)
    # scatter_add_ into E+1 bins: bincount's output size would depend on the data.
    counts = torch.zeros(num_experts + 1, dtype=key.dtype, device=key.device)
    counts = counts.scatter_add_(0, key, torch.ones_like(key))[:num_experts]
    sorted_key = key[slots]
    tokens = torch.div(slots, num_slots, rounding_mode="floor")
    valid = sorted_key < num_experts
    experts = sorted_key.clamp(max=max(num_experts - 1, 0))
    return slots, tokens, experts, counts, counts.cumsum(0).to(torch.int32), valid


# At most this many slots on CPU without the C++ sort, the sort runs in Python: a few list
# operations instead of a dozen tiny torch ops (about 10 us each, most of a one-token
# decode step's routing cost; gatelab bench generate).
HOST_SORT_SLOTS = 256


def sort_slots_host(
    experts: Tensor, num_experts: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`sort_slots` computed in Python from ``experts.tolist()``: the same six
    tensors, for small CPU calls (it reads the ids on the host)."""
    num_slots = experts.shape[1]
    key = [e if 0 <= e < num_experts else num_experts for e in experts.reshape(-1).tolist()]
    order = sorted(range(len(key)), key=key.__getitem__)  # stable, as argsort(stable=True)
    counts = [0] * (num_experts + 1)
    for k in key:
        counts[k] += 1
    ends, total = [], 0
    for c in counts[:num_experts]:
        total += c
        ends.append(total)
    sorted_key = [key[i] for i in order]
    top = max(num_experts - 1, 0)
    device = experts.device
    # The four int64 results in one tensor (a torch.tensor call costs ~3 us, a view ~1 us).
    slots, tokens, expert_ids, counts = torch.tensor(
        order + [i // num_slots for i in order] + [min(k, top) for k in sorted_key] + counts,
        dtype=torch.int64,
        device=device,
    ).split([len(order)] * 3 + [num_experts + 1])
    return (
        slots,
        tokens,
        expert_ids.to(experts.dtype),
        counts[:num_experts].to(experts.dtype),
        torch.tensor(ends, dtype=torch.int32, device=device),
        torch.tensor([k < num_experts for k in sorted_key], dtype=torch.bool, device=device),
    )


def _small_inference(x, experts, weights, bank, activation) -> Tensor | None:
    """A small CPU inference call (a decode step) in one C++ call: the phase-wise forward
    with its sort and combine (``native.small_forward``, the same ops and bits), where it
    builds, takes these tensors, and phase-wise is the strategy the rule picks; else None.

    At one token, Python's ~40 small torch calls around the two projections took about
    as long as the projections (docs/benchmarks.md, "CPU strategies").
    """
    kernel = native.activation_index(activation)
    if kernel is None or not native.small_fits(x, bank):
        return None
    counts = [0] * bank.num_experts
    for e in experts.reshape(-1).tolist():
        if e >= 0:  # check_dispatch_inputs has refused ids past the experts
            counts[e] += 1
    if _cpu_strategy(counts, bank.w_out, activation) != "phases":
        return None
    return native.small_forward(x, experts, weights, bank, kernel)


def padded_targets(routed, shape: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """(slots, tokens) for :func:`combine` with the padding rows sent to the dropped row."""
    slots, tokens, valid = routed[0], routed[1], routed[5]
    num_tokens, num_slots = shape
    return (
        torch.where(valid, slots, num_tokens * num_slots),
        torch.where(valid, tokens, num_tokens),
    )


def compact_slots(routed) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The routed rows of :func:`sort_slots` alone (slots, tokens, experts, counts, offsets).

    Reads the routed count on the host, a synchronisation on accelerators: for the callers
    that size buffers on the host anyway (expert parallelism's all-to-all splits, the
    triton dispatcher's launch grid) and the double-backward path.
    """
    slots, tokens, experts, counts, offsets, _ = routed
    rows = _routed_rows(routed)
    return slots[:rows], tokens[:rows], experts[:rows], counts, offsets


def grouped_dispatch(
    x: Tensor, experts: Tensor, weights: Tensor, bank: ExpertWeights, deterministic: bool = True
) -> Tensor:
    """Sum over slots of weight * expert(x) for x [T, D], experts/weights [T, K]."""
    check_dispatch_inputs(x, experts, weights, bank)
    activation, shape = as_activation(bank.activate), tuple(experts.shape)
    tensors = (x, weights, bank.w_in, bank.w_out, bank.b_in, bank.b_out)
    inference = not torch.is_grad_enabled() or not any(
        t is not None and t.requires_grad for t in tensors
    )
    host = _host_side(experts) and experts.numel() <= HOST_SORT_SLOTS
    if host and inference:
        if (out := _small_inference(x, experts, weights, bank, activation)) is not None:
            return out
    if host and not native.sort_fits(experts):
        routed = sort_slots_host(experts, bank.num_experts)
    else:  # in C++ on CPU where that builds (6-9 us a decode step, Python's 46-128 us)
        routed = sort_slots(experts, bank.num_experts)
    slot_weights = weights.reshape(-1)[routed[0]]
    inputs = (x, slot_weights, bank.w_in, bank.w_out, bank.b_in, bank.b_out)
    if inference:
        # Inference (decode): the same forward without an autograd node: no saved
        # buffers, leases or ctx (the Function's own overhead was ~185 us a call at one
        # token, beside ~250 us of GEMMs).
        y, _ = _forward(_NoGrad(), *inputs, activation, routed)
        return _combine_out(y, routed, shape, deterministic).to(x.dtype)
    return GroupedExperts.apply(*inputs, activation, routed, shape, deterministic)
