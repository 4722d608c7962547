"""The triton dispatcher's autograd Function and kernel launches.

Importing this module imports triton (see ``kernels.py``); ``gatelab.dispatch.triton``
imports it only on first use.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
from torch import Tensor

from ...experts.activation import as_activation
from ..grouped import composite_backward, sort_slots
from . import configs, kernels

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
"""Whether triton was imported in interpreter mode (kernels run on CPU tensors, in numpy)."""

DECODE_SLOTS = 128
"""Routed slots up to which the decode table (one program per expert and output block)
is used: below a few hundred tokens a GEMM per expert is bound by reading its weights
(HF measured batched_mm ahead of grouped_mm below 2^6-2^9 tokens, notes-anchors.md §3)."""

# Autotune cache keys per kernel: the sizes that change the best tiles (triton adds the
# tensors' dtypes). Triton rejects names that are not the kernel's arguments.
_KEYS = {
    "up_proj_kernel": ["D", "F", "BLOCK_M"],
    "gather_gemm_kernel": ["K", "N", "BLOCK_M", "OUT_MODE"],
    "wgrad_kernel": ["M", "N"],
    "act_backward_kernel": ["F"],
}

AUTOTUNE = True
"""Let triton.autotune time the family's configs on first use of a size; False runs the
"default" family's one small config (tests on CUDA: many tiny sizes, nothing to tune)."""


@functools.cache
def _tuned(name: str, kind: str, family: str, tune: bool):
    """``kernels.<name>`` wrapped in triton.autotune over ``family``'s configs.

    The "default" config (small tiles, two stages) is always a candidate: it fits in
    shared memory for float32 too, where the large bf16 tiles may not (a config that does
    not fit is timed as infinitely slow by the autotuner). Atomically accumulated outputs
    are zeroed before each trial.
    """
    table = configs.AUTOTUNE[kind]
    entries = [*table[family], *table["default"]] if tune else table["default"]
    tuned = []
    for entry in entries:
        meta = {k: v for k, v in entry.items() if k.startswith("BLOCK")}
        tuned.append(
            triton.Config(meta, num_warps=entry["num_warps"], num_stages=entry["num_stages"])
        )
    reset = ["out_ptr"] if name == "gather_gemm_kernel" else None
    return triton.autotune(tuned, key=_KEYS[name], reset_to_zero=reset)(getattr(kernels, name))


def _launch(name: str, kind: str, grid, device: torch.device, *args, **meta) -> None:
    """Run a kernel: the one interpreter config on CPU, the autotuned kernel on a GPU.

    ``grid`` maps the launch's block sizes to the grid; BLOCK_M in ``meta`` (fixed by the
    row-block table) is passed through, the rest comes from the config.
    """
    if INTERPRET:
        sizes = {k: v for k, v in configs.INTERPRET.items() if k not in meta}
        if name == "act_backward_kernel":
            sizes.pop("BLOCK_K")
        full = {**meta, **sizes}
        getattr(kernels, name)[grid(full)](*args, **full)
        return
    _tuned(name, kind, configs.family(device), AUTOTUNE)[grid](*args, **meta)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input precision: fp32 matmuls use TF32 only where torch would."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


class RowBlocks:
    """The row-block table the kernels read: which expert and which sorted rows each
    program owns, built on the device without a host sync.

    ``decode`` gives one block per expert (idle experts: zero rows, their programs return
    at once); otherwise each expert's rows are cut into blocks of ``block_m``, and the
    table is sized for the worst case (ceil(N / block_m) + E blocks), spare blocks
    having zero rows.
    """

    def __init__(self, counts: Tensor, num_rows: int, block_m: int, decode: bool):
        num_experts = counts.shape[0]
        counts = counts.to(torch.int32)
        starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        self.block_m, self.starts, self.counts = block_m, starts, counts
        if decode:
            self.expert = torch.arange(num_experts, dtype=torch.int32, device=counts.device)
            self.start, self.rows = starts, counts
            return
        per_expert = (counts + block_m - 1) // block_m
        ends = torch.cumsum(per_expert, 0)
        bound = (num_rows + block_m - 1) // block_m + num_experts
        block = torch.arange(bound, device=counts.device)
        expert = torch.searchsorted(ends, block, right=True).clamp_(max=num_experts - 1)
        first = ends[expert] - per_expert[expert]  # the expert's first block id
        offset = (block - first) * block_m
        rows = (counts[expert] - offset).clamp_(0, block_m)
        rows = torch.where(block < ends[-1], rows, 0)
        self.expert = expert.to(torch.int32)
        self.start = (starts[expert] + offset).to(torch.int32)
        self.rows = rows.to(torch.int32)

    @property
    def num_blocks(self) -> int:
        return self.expert.shape[0]

    def args(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.expert, self.start, self.rows


def up_proj(x, tokens, w_in, b_in, scale, blocks, act_code, glu, save_hidden, kind):
    """(hidden [N, H] or None, weight * act [N, F]) for the sorted rows."""
    rows, ffn = tokens.shape[0], w_in.shape[1] // (2 if glu else 1)
    act = torch.empty(rows, ffn, dtype=w_in.dtype, device=x.device)
    # Inference keeps no pre-activation: the kernel never writes ``hidden`` then.
    hidden = (
        torch.empty(rows, w_in.shape[1], dtype=w_in.dtype, device=x.device) if save_hidden else act
    )
    bias = b_in if b_in is not None else w_in  # never read without HAS_BIAS

    def grid(meta):
        return (blocks.num_blocks, triton.cdiv(ffn, meta["BLOCK_N"]))

    _launch(
        "up_proj_kernel",
        "decode" if kind == "decode" else "up",
        grid,
        x.device,
        x,
        tokens,
        w_in,
        bias,
        scale,
        hidden,
        act,
        *blocks.args(),
        x.shape[1],
        ffn,
        x.stride(0),
        x.stride(1),
        w_in.stride(0),
        w_in.stride(1),
        w_in.stride(2),
        bias.stride(0),
        hidden.stride(0),
        act.stride(0),
        GLU=glu,
        ACT=act_code,
        HAS_BIAS=b_in is not None,
        SAVE_HIDDEN=save_hidden,
        PRECISION=_precision(x.dtype),
        BLOCK_M=blocks.block_m,
    )
    return (hidden if save_hidden else None), act


def gather_gemm(a, a_idx, b, transpose_b, blocks, out, out_idx, mode, kind, bias=None, scale=None):
    """Rows of A (gathered through ``a_idx`` when given) times B[e] into ``out``.

    B is [E, N, K] (``transpose_b`` False: y = a @ B[e].T) or [E, K, N] (True: a @ B[e]).
    ``mode``/``out_idx``: see ``gather_gemm_kernel``'s OUT_MODE.
    """
    n_cols = b.shape[2] if transpose_b else b.shape[1]
    k_dim = a.shape[1]
    stride_bk, stride_bn = (b.stride(1), b.stride(2)) if transpose_b else (b.stride(2), b.stride(1))
    dummy = a_idx if a_idx is not None else blocks.start
    bias_t = bias if bias is not None else b

    def grid(meta):
        return (blocks.num_blocks, triton.cdiv(n_cols, meta["BLOCK_N"]))

    _launch(
        "gather_gemm_kernel",
        kind,
        grid,
        a.device,
        a,
        dummy,
        b,
        bias_t,
        scale if scale is not None else a,
        out,
        out_idx if out_idx is not None else dummy,
        *blocks.args(),
        k_dim,
        n_cols,
        a.stride(0),
        a.stride(1),
        b.stride(0),
        stride_bk,
        stride_bn,
        bias_t.stride(0),
        out.stride(0),
        out.stride(1),
        GATHER_A=a_idx is not None,
        HAS_BIAS=bias is not None,
        OUT_MODE=mode,
        PRECISION=_precision(a.dtype),
        BLOCK_M=blocks.block_m,
    )
    return out


def wgrad(g, g_idx, a, a_idx, blocks, num_experts, dtype):
    """[E, M, N]: per expert, G[its rows].T @ A[its rows] (rows gathered through the idx)."""
    m_dim, n_dim = g.shape[1], a.shape[1]
    out = torch.empty(num_experts, m_dim, n_dim, dtype=dtype, device=a.device)
    dummy = blocks.starts

    def grid(meta):
        return (
            num_experts,
            triton.cdiv(m_dim, meta["BLOCK_M"]),
            triton.cdiv(n_dim, meta["BLOCK_N"]),
        )

    _launch(
        "wgrad_kernel",
        "wgrad",
        grid,
        a.device,
        g,
        g_idx if g_idx is not None else dummy,
        a,
        a_idx if a_idx is not None else dummy,
        out,
        blocks.starts,
        blocks.counts,
        m_dim,
        n_dim,
        g.stride(0),
        g.stride(1),
        a.stride(0),
        a.stride(1),
        out.stride(0),
        out.stride(1),
        out.stride(2),
        GATHER_G=g_idx is not None,
        GATHER_A=a_idx is not None,
        PRECISION=_precision(a.dtype),
    )
    return out


def act_backward(hidden, g_act, scale, act_code, glu):
    """(d hidden [N, H], d weight [N] fp32) from d (weight * act) [N, F]."""
    rows, ffn = g_act.shape
    g_hidden = torch.empty_like(hidden)
    g_scale = torch.empty(rows, dtype=torch.float32, device=hidden.device)
    block_m = configs.INTERPRET["BLOCK_M"] if INTERPRET else 32

    def grid(meta):
        return (triton.cdiv(rows, block_m),)

    _launch(
        "act_backward_kernel",
        "act",
        grid,
        hidden.device,
        hidden,
        g_act,
        scale,
        g_hidden,
        g_scale,
        rows,
        ffn,
        hidden.stride(0),
        g_act.stride(0),
        g_hidden.stride(0),
        GLU=glu,
        ACT=act_code,
        BLOCK_M=block_m,
    )
    return g_hidden, g_scale


def _segment_sum(rows: Tensor, counts: Tensor) -> Tensor:
    return torch.segment_reduce(rows, "sum", lengths=counts, axis=0, unsafe=True)


def combine_out(shape, width, dtype, device, deterministic):
    """The buffer a scattering GEMM writes into: [T*K, width] in slot order (deterministic,
    summed over k afterwards) or [T, width] fp32 for atomic adds."""
    num_tokens, num_slots = shape
    if deterministic:
        return torch.zeros(num_tokens * num_slots, width, dtype=dtype, device=device)
    return torch.zeros(num_tokens, width, dtype=torch.float32, device=device)


def finish_combine(out, shape, deterministic, dtype):
    if deterministic:
        num_tokens, num_slots = shape
        return out.view(num_tokens, num_slots, out.shape[1]).sum(dim=1).to(dtype)
    return out.to(dtype)


class TritonExperts(torch.autograd.Function):
    """out[t] = sum over t's slots of w * (W_out act(W_in x_t + b_in) + b_out), in triton.

    Forward: up_proj (gather + GEMM + activation epilogue), then gather_gemm scattering
    each row to its slot (deterministic) or adding it to its token (atomics). Backward:
    d act by a GEMM reading grad_out rows in place, the activation backward kernel, the
    weight gradients by per-expert reductions, and dX by the transposed GEMM with the
    same combine as forward.
    """

    @staticmethod
    def forward(ctx, x, slot_weights, w_in, w_out, b_in, b_out, act, routed, shape, deterministic):
        act, activation = act
        act_code, glu = act
        # All T*K slots (sort_slots' fixed shapes, no host read): the blocks cover only the
        # routed rows, so no kernel reads or writes a padding row; backward masks g_scale.
        slots, tokens, experts, counts, _, valid = routed
        rows = tokens.shape[0]
        decode = rows <= DECODE_SLOTS
        block_m = (
            configs.INTERPRET["BLOCK_M"]
            if INTERPRET
            else (configs.DECODE_BLOCK_M if decode else configs.BLOCK_M[configs.family(x.device)])
        )
        blocks = RowBlocks(counts, rows, block_m, decode)
        kind = "decode" if decode else "gemm"
        ctx.x_dtype = x.dtype
        x_in, x = x, x.to(w_in.dtype).contiguous()
        b_in = b_in.contiguous() if b_in is not None else None
        b_out = b_out.contiguous() if b_out is not None else None
        training = any(ctx.needs_input_grad)
        out = combine_out(shape, x.shape[1], w_in.dtype, x.device, deterministic)
        hidden = None
        act_rows = x.new_empty(0, w_out.shape[2])
        if rows:
            scale = slot_weights.to(torch.float32).contiguous()
            hidden, act_rows = up_proj(
                x, tokens, w_in, b_in, scale, blocks, act_code, glu, training, kind
            )
            index = slots if deterministic else tokens
            gather_gemm(
                act_rows,
                None,
                w_out,
                False,
                blocks,
                out,
                index,
                1 if deterministic else 2,
                kind,
                bias=b_out,
                scale=scale,
            )
        ctx.save_for_backward(
            x_in,
            x,
            hidden,
            act_rows,
            slot_weights,
            w_in,
            w_out,
            b_in,
            b_out,
            slots,
            tokens,
            experts,
            counts,
            valid,
        )
        ctx.blocks, ctx.kind, ctx.act, ctx.shape = blocks, kind, act, shape
        ctx.activation = activation
        ctx.deterministic = deterministic
        return finish_combine(out, shape, deterministic, ctx.x_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors  # once: a checkpointed graph unpacks each tensor once
        if torch.is_grad_enabled():  # create_graph=True: differentiate the composite path
            x_in, _, _, _, slot_weights, w_in, w_out, b_in, b_out, *routed = saved
            inputs = (x_in, slot_weights, w_in, w_out, b_in, b_out)
            routed = (*routed[:4], None)  # composite_experts reads the first counts.sum() rows
            grads = composite_backward(ctx, inputs, ctx.activation, routed, grad_out)
            return (*grads, None, None, None, None)
        return TritonExperts._backward(ctx, saved[1:], grad_out)

    @staticmethod
    def _backward(ctx, saved, grad_out):
        x, hidden, act_rows, slot_weights, w_in, w_out, b_in, b_out = saved[:8]
        slots, tokens, experts, counts, valid = saved[8:]
        need_x, need_scale, need_w_in, need_w_out, need_b_in, need_b_out = ctx.needs_input_grad[:6]
        act_code, glu = ctx.act
        blocks, kind, rows = ctx.blocks, ctx.kind, tokens.shape[0]
        if rows == 0:
            return _zero_grads(ctx, x, slot_weights, w_in, w_out, b_in, b_out)
        grad_out = grad_out.to(w_in.dtype).contiguous()
        scale = slot_weights.to(torch.float32).contiguous()

        g_w_out = g_b_out = g_w_in = g_b_in = g_x = None
        if need_w_out:
            g_w_out = wgrad(grad_out, tokens, act_rows, None, blocks, w_out.shape[0], w_out.dtype)
        g_act = torch.empty_like(act_rows)
        gather_gemm(grad_out, tokens, w_out, True, blocks, g_act, None, 0, kind)
        g_hidden, g_scale = act_backward(hidden, g_act, scale, act_code, glu)
        if b_out is not None:
            gy = grad_out[tokens]  # only with biases: the bias terms are per-row sums
            g_scale += (gy.float() * b_out[experts].float()).sum(dim=1)
            if need_b_out:
                g_b_out = _segment_sum(gy * slot_weights.to(gy.dtype).unsqueeze(1), counts)
        if need_w_in:
            g_w_in = wgrad(g_hidden, None, x, tokens, blocks, w_in.shape[0], w_in.dtype)
        if need_b_in:
            g_b_in = _segment_sum(g_hidden, counts)
        if need_x:
            out = combine_out(ctx.shape, x.shape[1], w_in.dtype, x.device, ctx.deterministic)
            index = slots if ctx.deterministic else tokens
            mode = 1 if ctx.deterministic else 2
            gather_gemm(g_hidden, None, w_in, True, blocks, out, index, mode, kind)
            g_x = finish_combine(out, ctx.shape, ctx.deterministic, ctx.x_dtype)
        # Padding rows computed on unwritten rows: their weights get no gradient.
        g_scale = torch.where(valid, g_scale, 0).to(slot_weights.dtype) if need_scale else None
        return g_x, g_scale, g_w_in, g_w_out, g_b_in, g_b_out, None, None, None, None


def _zero_grads(ctx, x, slot_weights, w_in, w_out, b_in, b_out):
    """Nothing was routed: every gradient is zero (the graph is kept, as grouped keeps it)."""
    tensors = (x, slot_weights, w_in, w_out, b_in, b_out)
    grads = [
        torch.zeros_like(t) if need and t is not None else None
        for need, t in zip(ctx.needs_input_grad[:6], tensors, strict=True)
    ]
    if grads[0] is not None:
        grads[0] = grads[0].to(ctx.x_dtype)
    return (*grads, None, None, None, None)


def run(x, experts, weights, bank, act_code, glu, deterministic) -> Tensor:
    """Sort the slots and run :class:`TritonExperts` (arguments checked by the caller)."""
    routed = sort_slots(experts, bank.num_experts)
    slot_weights = weights.reshape(-1)[routed[0]]
    return TritonExperts.apply(
        x,
        slot_weights,
        bank.w_in,
        bank.w_out,
        bank.b_in,
        bank.b_out,
        ((act_code, glu), as_activation(bank.activate)),
        routed,
        tuple(experts.shape),
        deterministic,
    )
