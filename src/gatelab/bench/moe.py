"""``gatelab bench moe``: the MoE layer against an equal-FLOP dense MLP and HF, in one process.

For each shape (T tokens, width D, expert width F, E experts, top-k) it times, forward and
forward+backward, median of repeats after warm-up:

- ``dense``: a SwiGLU MLP of hidden width k*F, the same active FLOPs as the MoE's experts
  (gate_up [2kF, D], down [D, kF], through ``F.linear``);
- ``gatelab_grouped`` and ``gatelab_loop``: ``gatelab.MoE`` with the ``topk`` router
  (normalised, as Mixtral routes) and the grouped or the loop dispatcher;
- ``gatelab_triton``: the same layer through the triton dispatcher (CUDA with triton
  installed only; deterministic combine, as the layer's default);
- ``hf_eager`` and ``hf_grouped_mm``: a ``MixtralSparseMoeBlock`` from transformers that
  holds the very same parameters as the gatelab layer, run with each experts
  implementation. Once per shape the gatelab output is checked against HF eager's.

The ratio reported for each variant is dense time / variant time (> 1: faster than dense).
For small-batch (decode) shapes, where the cost is reading the weights, the forward time
is also compared with a weight-bandwidth roofline: the bytes of the distinct experts the
batch touches over a copy bandwidth measured in the same run.

How it is measured, so the numbers are comparable:
- forward runs under ``torch.no_grad()`` (inference); forward+backward runs with grad on
  the input and every parameter and back-propagates a fixed random ``grad_output``
  (``out.sum().backward()`` would feed an expanded, stride-0 gradient that takes unusual
  kernel paths);
- gradients are set to None before each call, outside the clock;
- the variants are timed round-robin (each round times every variant once), so load from
  other processes on a shared machine affects them alike;
- on CUDA the device is synchronised around each timed call.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor

from ..layers import MoE
from .common import (
    copy_bandwidth,
    device_sync,
    environment,
    load_average,
    log_stderr,
    median,
    resolve_device,
    timeit,
    utc_now,
)
from .shapes import DECODE_TOKENS, SHAPE_FORMAT, Shape, default_shapes, parse_shape
from .tables import format_moe_table as format_table
from .variants import (
    COMPILED_VARIANTS,
    MOE_VARIANTS,
    VARIANTS,
    Variant,
    build_gatelab_moe,
    compiled,
    dense_mlp,
    gatelab_grouped,
    gatelab_loop,
    gatelab_triton,
    hf_available,
    hf_eager,
    hf_grouped_mm,
    triton_available,
)

SCHEMA = "gatelab.bench.moe/1"

LOOP_MAX_EXPERTS = 256
"""Above this many experts the per-expert loops (gatelab loop, HF eager) are not timed."""

QUICK_LOOP_MAX_EXPERTS = 16
"""With --quick the per-expert loops are timed only up to this many experts."""

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


# -- settings ---------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """How to run: device, dtype (None: fp32 on CPU, bf16 on CUDA), warm-up and repeats
    (None: defaults by device and --quick), whether to run HF and the compiled variants,
    and the copy-probe size."""

    device: str = "cpu"
    dtype: str | None = None
    warmup: int | None = None
    repeats: int | None = None
    quick: bool = False
    hf: bool = True
    compile: bool = False
    compile_backend: str = "inductor"
    copy_bytes: int = 256 * 2**20
    seed: int = 0

    def resolved(self) -> BenchSettings:
        """A copy with every None filled in and the device and dtype validated."""
        device = resolve_device(self.device)
        on_cuda = device == "cuda"
        dtype = self.dtype or ("bfloat16" if on_cuda else "float32")
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; valid names are: {', '.join(DTYPES)}")
        warmup = self.warmup if self.warmup is not None else (1 if self.quick else 2)
        repeats = self.repeats
        if repeats is None:
            repeats = (3 if self.quick else 5) if not on_cuda else (5 if self.quick else 10)
        if warmup < 0 or repeats < 1:
            raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
        canonical = str(DTYPES[dtype]).removeprefix("torch.")
        return replace(self, device=device, dtype=canonical, warmup=warmup, repeats=repeats)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


# -- measuring ----------------------------------------------------------------------------


def measure(
    variants: dict[str, Variant],
    x: Tensor,
    grad_out: Tensor,
    warmup: int,
    repeats: int,
    sync: Callable[[], None] | None,
) -> dict[str, dict]:
    """Median forward (no grad) and forward+backward (fixed grad_output) time per variant.

    Variants are timed round-robin: each of the ``repeats`` rounds times every variant
    once in each mode (the first round warms each one up just before its first timed
    call). Load from other processes on a shared machine then lands on all variants alike
    instead of on whichever one was running, so the ratios stay fair; and no variant
    finds its weights left in cache by its own previous call.
    """
    calls = {name: _timed_calls(variant, x, grad_out) for name, variant in variants.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"fwd": [], "fwd_bwd": []} for name in calls}
    for round_ in range(repeats):
        first = warmup if round_ == 0 else 0
        for name, (forward, forward_backward, clear_grads) in calls.items():
            times[name]["fwd"] += timeit(forward, first, 1, sync=sync)
            times[name]["fwd_bwd"] += timeit(
                forward_backward, first, 1, setup=clear_grads, sync=sync
            )
            clear_grads()
    return {
        name: {
            "fwd_s": median(t["fwd"]),
            "fwd_bwd_s": median(t["fwd_bwd"]),
            "fwd_min_s": min(t["fwd"]),
            "fwd_bwd_min_s": min(t["fwd_bwd"]),
            "fwd_times_s": t["fwd"],
            "fwd_bwd_times_s": t["fwd_bwd"],
        }
        for name, t in times.items()
    }


def _timed_calls(variant: Variant, x: Tensor, grad_out: Tensor):
    """(forward, forward+backward, reset gradients) closures for one variant."""

    def forward() -> None:
        with torch.no_grad():
            variant.forward(x)

    def forward_backward() -> None:
        variant.forward(x).backward(grad_out)

    def clear_grads() -> None:
        x.grad = None
        for p in variant.params:
            p.grad = None

    return forward, forward_backward, clear_grads


def check_against_hf(moe: MoE, eager: Variant, x: Tensor) -> dict:
    """Max |gatelab - HF eager| on x, and whether it is within the dtype's tolerance."""
    with torch.no_grad():
        ours = moe(x).float()
        theirs = eager.forward(x).float()
    scale = max(1.0, theirs.abs().max().item()) if theirs.numel() else 1.0
    rel = 1e-4 if x.dtype in (torch.float32, torch.float64) else 3e-2
    diff = (ours - theirs).abs().max().item() if ours.numel() else 0.0
    finite = math.isfinite(diff)
    return {
        "against": "hf_eager",
        "max_abs_diff": diff if finite else None,
        "tolerance": rel * scale,
        "ok": finite and diff <= rel * scale,
    }


def decode_roofline(moe: MoE, x: Tensor, bandwidth: dict) -> dict:
    """The weight-streaming lower bound on the forward time for this batch's routing.

    Bytes = distinct experts the batch routes to * 3*D*F weights * itemsize (gate, up and
    down projections; the router and activations are left out), over the measured copy
    bandwidth.
    """
    with torch.no_grad():
        experts = moe.router(x.reshape(-1, moe.dim)).experts
    distinct = int(torch.unique(experts[experts >= 0]).numel())
    itemsize = moe.experts.down_proj.element_size()
    nbytes = distinct * 3 * moe.dim * moe.hidden_dim * itemsize
    return {
        "distinct_experts": distinct,
        "bytes": nbytes,
        "seconds": nbytes / bandwidth["bytes_per_s"],
    }


def skip_reason(name: str, shape: Shape, settings: BenchSettings) -> str | None:
    """Why a variant is not timed on this shape, or None.

    The two per-expert loops (gatelab's loop and HF eager, whose backward also builds a
    dense [E, ...] gradient per expert) are left out of --quick runs on many-expert shapes,
    and of any run with more experts than a loop can get through in reasonable time.
    """
    if name in COMPILED_VARIANTS:
        if not settings.compile:
            return "needs --compile"
        name = name.removesuffix("_compiled")
    if name in ("hf_eager", "hf_grouped_mm"):
        if not settings.hf:
            return "--no-hf"
        if not hf_available():
            return "transformers is not installed (pip install 'gatelab[hf]')"
    if name == "gatelab_triton":
        if settings.device != "cuda":
            return "CUDA only (triton kernels)"
        if not triton_available():
            return "triton is not installed (pip install 'gatelab[gpu]')"
    if name in ("gatelab_loop", "hf_eager"):
        if settings.quick and shape.num_experts > QUICK_LOOP_MAX_EXPERTS:
            return f"--quick: per-expert loops not timed above E={QUICK_LOOP_MAX_EXPERTS}"
        if shape.num_experts > LOOP_MAX_EXPERTS:
            return f"too slow above E={LOOP_MAX_EXPERTS} (one launch per expert)"
    return None


def bench_shape(
    shape: Shape, settings: BenchSettings, bandwidth: dict, log: Callable[[str], None]
) -> dict:
    """Every variant on one shape, plus the HF check, ratios and (decode) roofline."""
    device, dtype = settings.device, settings.torch_dtype
    torch.manual_seed(settings.seed)
    moe = build_gatelab_moe(shape, device, dtype)
    x = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype)
    hf_check = None
    if settings.hf and hf_available():
        hf_check = check_against_hf(moe, hf_eager(moe), x)
    variants, skipped = build_variants(shape, settings, moe, log)
    compile_s = compile_variants(variants, x, grad_out, device_sync(device), log)
    log(f"  {shape.name}: timing {', '.join(variants)} round-robin")
    timed = measure(variants, x, grad_out, settings.warmup, settings.repeats, device_sync(device))
    results = {
        name: {"skipped": skipped[name]} if name in skipped else {"skipped": None, **timed[name]}
        for name in variant_names(settings)
    }
    for name, seconds in compile_s.items():
        results[name]["compile_s"] = seconds
    roofline = decode_roofline(moe, x, bandwidth) if shape.decode else None
    add_ratios(results, roofline)
    return {
        "name": shape.name,
        "spec": shape.spec,
        **{k: v for k, v in asdict(shape).items() if k != "name"},
        "decode": shape.decode,
        "active_flops_fwd": shape.active_flops(),
        "hf_check": hf_check,
        "roofline": roofline,
        "variants": results,
    }


def variant_names(settings: BenchSettings) -> tuple[str, ...]:
    """The variants a run reports: the compiled ones only with ``--compile``."""
    return VARIANTS + (COMPILED_VARIANTS if settings.compile else ())


def compile_variants(
    variants: dict[str, Variant],
    x: Tensor,
    grad_out: Tensor,
    sync: Callable[[], None] | None,
    log: Callable[[str], None],
) -> dict[str, float]:
    """Compile each compiled variant (forward without grad, then forward+backward) outside
    the clock; returns the seconds each took."""
    seconds = {}
    for name, variant in variants.items():
        if name in COMPILED_VARIANTS:
            log(f"  compiling {name}")
            forward, forward_backward, clear_grads = _timed_calls(variant, x, grad_out)
            seconds[name] = sum(
                timeit(call, 0, 1, sync=sync)[0] for call in (forward, forward_backward)
            )
            clear_grads()
    return seconds


def build_variants(
    shape: Shape, settings: BenchSettings, moe: MoE, log: Callable[[str], None]
) -> tuple[dict[str, Variant], dict[str, str]]:
    """The variants to time on ``shape`` (built in ``VARIANTS`` order, so the dense MLP's
    initialisation draws from the seeded generator as it always has; a compiled variant
    shares its eager variant's parameters) and why the others are skipped."""
    builders: dict[str, Callable[[], Variant]] = {
        "dense": lambda: dense_mlp(shape, settings.device, settings.torch_dtype),
        "gatelab_grouped": lambda: gatelab_grouped(moe),
        "gatelab_triton": lambda: gatelab_triton(moe),
        "gatelab_loop": lambda: gatelab_loop(moe),
        "hf_eager": lambda: hf_eager(moe),
        "hf_grouped_mm": lambda: hf_grouped_mm(moe),
        **{
            name: (
                lambda name=name: compiled(
                    variants[name.removesuffix("_compiled")], settings.compile_backend
                )
            )
            for name in COMPILED_VARIANTS
        },
    }
    skipped: dict[str, str] = {}
    variants: dict[str, Variant] = {}
    for name in variant_names(settings):
        reason = skip_reason(name, shape, settings)
        if reason is None:
            variants[name] = builders[name]()
        else:
            skipped[name] = reason
            log(f"  {shape.name}: {name} skipped ({reason})")
    return variants, skipped


def add_ratios(results: dict[str, dict], roofline: dict | None) -> None:
    """Add dense time / variant time to every timed variant and, on a decode shape, the
    roofline fraction to every timed MoE variant."""
    dense = results["dense"]
    for entry in results.values():
        if entry["skipped"] is None:
            entry["ratio_fwd"] = dense["fwd_s"] / entry["fwd_s"]
            entry["ratio_fwd_bwd"] = dense["fwd_bwd_s"] / entry["fwd_bwd_s"]
    if roofline is None:
        return
    for name, entry in results.items():
        if name != "dense" and name != "dense_compiled" and entry["skipped"] is None:
            entry["roofline_fwd"] = roofline["seconds"] / entry["fwd_s"]


def run_moe_bench(
    shapes: Sequence[Shape] | None = None,
    settings: BenchSettings | None = None,
    command: str | None = None,
    log: Callable[[str], None] | None = log_stderr,
) -> dict:
    """Run the benchmark and return the JSON-ready result (see ``SCHEMA``)."""
    settings = (settings or BenchSettings()).resolved()
    shapes = tuple(shapes) if shapes else default_shapes(settings.device, settings.quick)
    log = log or (lambda message: None)
    started, env_at_start = utc_now(), environment(settings.device)
    log(
        f"gatelab bench moe: {settings.device} {settings.dtype}, warmup {settings.warmup}, "
        f"repeats {settings.repeats}, {len(shapes)} shape(s)"
    )
    bandwidth = None
    if any(shape.decode for shape in shapes):
        log(f"  measuring copy bandwidth ({settings.copy_bytes / 2**20:.0f} MiB)")
        bandwidth = copy_bandwidth(settings.device, settings.copy_bytes)
    results = []
    for shape in shapes:
        log(f"shape {shape.name}: {shape.describe()}")
        results.append(bench_shape(shape, settings, bandwidth, log))
    return {
        "schema": SCHEMA,
        "command": command,
        "started_at": started,
        "finished_at": utc_now(),
        "environment": {
            **env_at_start,
            "load_average_1m_at_end": load_average(),
        },
        "settings": {
            **asdict(settings),
            "forward": "torch.no_grad()",
            "backward": "out.backward(fixed random grad_output); grads set to None before "
            "each call, outside the clock",
            "timer": "time.perf_counter; median of repeats after warm-up; variants timed "
            "round-robin, one call each per round"
            + ("; torch.cuda.synchronize around each call" if settings.device == "cuda" else ""),
            "ratio": "dense time / variant time (> 1: faster than the equal-FLOP dense MLP)",
            "roofline_fwd": "roofline seconds / measured forward seconds (1: at the bound)",
        },
        "copy_bandwidth": bandwidth,
        "shapes": results,
    }


__all__ = [
    "COMPILED_VARIANTS",
    "DECODE_TOKENS",
    "DTYPES",
    "LOOP_MAX_EXPERTS",
    "MOE_VARIANTS",
    "QUICK_LOOP_MAX_EXPERTS",
    "SCHEMA",
    "SHAPE_FORMAT",
    "VARIANTS",
    "BenchSettings",
    "Shape",
    "Variant",
    "bench_shape",
    "default_shapes",
    "format_table",
    "hf_available",
    "parse_shape",
    "resolve_device",
    "run_moe_bench",
    "skip_reason",
    "triton_available",
]
