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
- ``gemm_bound`` (CPU, training shapes): the gatelab layer's matrix products alone on the
  batch's routing, the router's and every expert's, one-thread GEMMs side by side
  (:func:`~gatelab.bench.variants.gemm_bound`); its ratio bounds what any dispatcher
  built on these GEMMs can reach on this machine.

The ratio reported for each variant is dense time / variant time (> 1: faster than dense).
For small-batch (decode) shapes, where the cost is reading the weights, the forward time
is also compared with a weight-bandwidth roofline: the bytes of the distinct experts the
batch touches over a copy bandwidth measured in the same run.

After the shapes comes a summary (:func:`summarize`): per variant, the forward+backward
ratio on every training shape (T > 64) with their geometric mean and minimum, the forward
ratio and roofline fraction on every decode shape with theirs, and per shape whether
gatelab grouped beats HF grouped_mm. ``--set sweep`` runs issue 17's shapes
(:data:`~gatelab.bench.shapes.SWEEP_TRAINING`, :data:`~gatelab.bench.shapes.SWEEP_DECODE`).

``--contended N`` times everything while N busy processes
(:func:`~gatelab.bench.common.busy_processes`) load the machine; with ``--baseline PATH``,
the JSON of an earlier idle run of the same shapes, the summary also gives per shape how
much gatelab grouped's MoE/dense time ratio grew under that load (issue 17's target: at
most 1.25x).

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

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import Tensor

from ..layers import MoE
from .common import (
    CONTENTION_METHOD,
    busy_processes,
    calls_per_sample,
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
from .shapes import (
    DECODE_TOKENS,
    SHAPE_FORMAT,
    SHAPE_SETS,
    Shape,
    default_shapes,
    parse_shape,
    shape_set,
)
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
    gemm_bound,
    hf_available,
    hf_eager,
    hf_grouped_mm,
    triton_available,
)

SCHEMA = "gatelab.bench.moe/1"

CONTENDED_TARGET = 1.25
"""Issue 17: with a busy process beside it, gatelab grouped's MoE/dense time ratio grows by
at most this factor over the idle run's (``--contended`` with ``--baseline``)."""

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
    the copy-probe size, the named shape set run when no shapes are given (None:
    ``"default"``) and how many busy processes load the machine while timing."""

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
    shape_set: str | None = None
    contended: int = 0

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
        if self.shape_set is not None and self.shape_set not in SHAPE_SETS:
            raise ValueError(
                f"unknown shape set {self.shape_set!r}; valid: {', '.join(SHAPE_SETS)}"
            )
        _check_contended(self.contended)
        canonical = str(DTYPES[dtype]).removeprefix("torch.")
        return replace(self, device=device, dtype=canonical, warmup=warmup, repeats=repeats)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


def _check_contended(contended: object) -> None:
    if not isinstance(contended, int) or isinstance(contended, bool) or contended < 0:
        raise ValueError(
            f"contended must be an integer >= 0 (busy processes; 0: none), got {contended!r}"
        )


def resolve_shapes(shapes: Sequence[Shape] | None, settings: BenchSettings) -> tuple[Shape, ...]:
    """``shapes`` as given, else the settings' shape set (default: ``"default"``) for the
    device and --quick. Giving both is a ValueError naming the fix."""
    if shapes and settings.shape_set is not None:
        raise ValueError(
            f"give either --shapes or --set, not both: --shapes replaces the set's shapes; "
            f"drop --set {settings.shape_set} or --shapes"
        )
    if shapes:
        return tuple(shapes)
    return shape_set(settings.shape_set or "default", settings.device, settings.quick)


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
    once (the first round warms each one up just before its first timed call), all the
    forward rounds first, then all the forward+backward rounds. Load from other processes
    on a shared machine then lands on all variants alike instead of on whichever one was
    running, so the ratios stay fair; no variant finds its weights left in cache by its
    own previous call; and no forward is timed right after a backward that wrote and
    freed [E, ...] weight gradients (384 MB at 1,1024,256,128,8, where the dense forward
    timed that way took 1.9, 3.4 and 5.2 ms in three runs).

    A forward sample shorter than ``common.MIN_SAMPLE_S`` (a decode shape) repeats the
    call back to back to fill it, as a decode loop does, and counts the time per call:
    timed alone right after another variant, a 1 ms call read 0.76 to 1.15 ms from run to
    run (the intra-op threads waking up). Forward+backward samples are one call each.
    """
    calls = {name: _timed_calls(variant, x, grad_out) for name, variant in variants.items()}
    times: dict[str, dict[str, list[float]]] = {name: {"fwd": [], "fwd_bwd": []} for name in calls}
    number = {name: calls_per_sample(c[0], sync) for name, c in calls.items()}
    for mode in ("fwd", "fwd_bwd"):
        for round_ in range(repeats):
            first = warmup if round_ == 0 else 0
            for name, (forward, forward_backward, clear_grads) in calls.items():
                if mode == "fwd":
                    times[name]["fwd"] += timeit(forward, first, 1, sync=sync, number=number[name])
                    continue
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
    if name == "gemm_bound":
        if settings.device != "cpu":
            return "CPU only (one-thread GEMMs on torch's threads)"
        if shape.decode:
            return "training shapes only (a decode shape's bound is the roofline)"
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
    variants, skipped = build_variants(shape, settings, moe, x, log)
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
    shape: Shape, settings: BenchSettings, moe: MoE, x: Tensor, log: Callable[[str], None]
) -> tuple[dict[str, Variant], dict[str, str]]:
    """The variants to time on ``shape`` with input ``x`` (built in ``VARIANTS`` order, so
    the dense MLP's initialisation draws from the seeded generator as it always has; a
    compiled variant shares its eager variant's parameters) and why the others are
    skipped."""
    builders: dict[str, Callable[[], Variant]] = {
        "dense": lambda: dense_mlp(shape, settings.device, settings.torch_dtype),
        "gatelab_grouped": lambda: gatelab_grouped(moe),
        "gatelab_triton": lambda: gatelab_triton(moe),
        "gatelab_loop": lambda: gatelab_loop(moe),
        "hf_eager": lambda: hf_eager(moe),
        "hf_grouped_mm": lambda: hf_grouped_mm(moe),
        "gemm_bound": lambda: gemm_bound(moe, x),
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
    baseline: dict | None = None,
) -> dict:
    """Run the benchmark and return the JSON-ready result (see ``SCHEMA``).

    ``shapes`` (default: the settings' shape set) are timed one after the other while
    ``settings.contended`` busy processes run. ``baseline`` is the result of an earlier
    idle run on the same shapes (see :func:`load_baseline`); with it, and only in a
    contended run, the summary holds the contended/idle comparison of issue 17.
    """
    settings = (settings or BenchSettings()).resolved()
    named_set = None if shapes else settings.shape_set or "default"
    shapes = resolve_shapes(shapes, settings)
    if baseline is not None:
        check_baseline(baseline, shapes, settings)
    log = log or (lambda message: None)
    started, env_at_start = utc_now(), environment(settings.device)
    log(
        f"gatelab bench moe: {settings.device} {settings.dtype}, warmup {settings.warmup}, "
        f"repeats {settings.repeats}, {len(shapes)} shape(s)"
        + (f", {settings.contended} busy process(es)" if settings.contended else "")
    )
    results = []
    with busy_processes(settings.contended):
        bandwidth = None
        if any(shape.decode for shape in shapes):
            log(f"  measuring copy bandwidth ({settings.copy_bytes / 2**20:.0f} MiB)")
            bandwidth = copy_bandwidth(settings.device, settings.copy_bytes)
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
        "shape_set": named_set,
        "contended": settings.contended,
        "settings": {
            **asdict(settings),
            "contention": CONTENTION_METHOD if settings.contended else None,
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
        "summary": summarize(results, baseline, settings.contended),
    }


# -- the summary ------------------------------------------------------------------------------


def _mode(shape: dict) -> str:
    """What a shape is judged on: the forward on decode shapes, forward+backward otherwise."""
    return "fwd" if shape["decode"] else "fwd_bwd"


def geomean(values: Sequence[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values))


def _group(shapes: list[dict], ratio_key: str, roofline: bool) -> dict:
    """Per variant (dense aside), ``ratio_key`` on each shape (None where skipped), with the
    geometric mean and minimum over the shapes it was timed on; on decode shapes the
    roofline fraction likewise."""
    variants = [name for name in (shapes[0]["variants"] if shapes else {}) if name != "dense"]
    shape_names = [s["name"] for s in shapes]
    group: dict = {
        "shapes": shape_names,
        "specs": [s["spec"] for s in shapes],
        "ratio": ratio_key,
        "variants": {},
    }
    for name in variants:
        entries = [s["variants"].get(name, {"skipped": "not run"}) for s in shapes]
        ratios = [e.get(ratio_key) if e["skipped"] is None else None for e in entries]
        record = _stats(ratios, shape_names)
        if record is None:
            continue  # skipped on every shape of the group
        if roofline:
            fractions = [e.get("roofline_fwd") if e["skipped"] is None else None for e in entries]
            record["roofline"] = _stats(fractions, shape_names)
        group["variants"][name] = record
    return group


def _stats(values: list[float | None], names: list[str]) -> dict | None:
    timed = [(v, name) for v, name in zip(values, names, strict=True) if v is not None]
    if not timed:
        return None
    low, where = min(timed)
    return {
        "values": values,
        "timed_shapes": len(timed),
        "geomean": geomean([v for v, _ in timed]),
        "min": low,
        "min_shape": where,
    }


def _share_of_bound(shapes: list[dict]) -> dict | None:
    """gatelab grouped's forward+backward time against the GEMM bound's on each training
    shape (bound time / gatelab time; 1: nothing but the GEMMs), with the statistics of
    :func:`_stats`; None where the bound was timed on no shape."""
    shares = []
    for shape in shapes:
        ours = shape["variants"]["gatelab_grouped"]
        bound = shape["variants"].get("gemm_bound", {"skipped": "not run"})
        timed = ours["skipped"] is None and bound["skipped"] is None
        shares.append(bound["fwd_bwd_s"] / ours["fwd_bwd_s"] if timed else None)
    return _stats(shares, [s["name"] for s in shapes])


def _against_hf(shape: dict) -> dict:
    """gatelab grouped vs HF grouped_mm on one shape, in the shape's mode."""
    mode = _mode(shape)
    ours, theirs = shape["variants"]["gatelab_grouped"], shape["variants"]["hf_grouped_mm"]
    record = {"shape": shape["name"], "spec": shape["spec"], "mode": mode}
    skipped = ours["skipped"] or theirs["skipped"]
    if skipped is not None:
        return {**record, "skipped": skipped, "beats": None}
    key = f"{mode}_s"
    speedup = theirs[key] / ours[key]
    return {
        **record,
        "skipped": None,
        "gatelab_grouped_s": ours[key],
        "hf_grouped_mm_s": theirs[key],
        "speedup": speedup,
        "beats": speedup > 1.0,
    }


def summarize(shapes: list[dict], baseline: dict | None = None, contended: int = 0) -> dict:
    """The run's summary (the ``summary`` of the JSON):

    - ``training``: the shapes with T > 64 and, per variant, ``ratio_fwd_bwd`` on each
      (``values``, None where skipped), their ``geomean`` and ``min`` (at ``min_shape``)
      over the shapes it was timed on (``timed_shapes``); and ``share_of_bound``, the
      same statistics of GEMM bound time / gatelab grouped time (None without the bound);
    - ``decode``: likewise ``ratio_fwd`` on the decode shapes, and ``roofline`` the same
      statistics of the roofline fraction;
    - ``gatelab_vs_hf_grouped_mm``: per shape (forward+backward on training shapes, forward
      on decode shapes) both times, ``speedup`` = HF time / gatelab time and ``beats``;
    - ``contended_vs_idle``: None, or with ``baseline``, per shape gatelab grouped's
      MoE/dense time ratio in this contended run over the baseline's (``slowdown``), and
      whether it is within ``target`` (issue 17: 1.25).
    """
    training = [s for s in shapes if not s["decode"]]
    decode = [s for s in shapes if s["decode"]]
    return {
        "ratio": "dense time / variant time (> 1: faster than the equal-FLOP dense MLP)",
        "training": {
            **_group(training, "ratio_fwd_bwd", roofline=False),
            "share_of_bound": _share_of_bound(training),
        },
        "decode": _group(decode, "ratio_fwd", roofline=True),
        "gatelab_vs_hf_grouped_mm": [_against_hf(s) for s in shapes],
        "contended_vs_idle": (
            None if baseline is None else contended_vs_idle(shapes, baseline, contended)
        ),
    }


def contended_vs_idle(shapes: list[dict], baseline: dict, contended: int) -> dict:
    """Per shape: gatelab grouped's MoE/dense time ratio (1 / ratio) in this run over the
    baseline's, in the shape's mode; > 1: contention hurt the MoE more than dense."""
    by_spec = {s["spec"]: s for s in baseline["shapes"]}
    rows = []
    for shape in shapes:
        mode = _mode(shape)
        key = f"ratio_{mode}"
        ours = shape["variants"]["gatelab_grouped"]
        idle = by_spec[shape["spec"]]["variants"]["gatelab_grouped"][key]
        row = {"shape": shape["name"], "spec": shape["spec"], "mode": mode, "idle_ratio": idle}
        if ours["skipped"] is not None:
            rows.append({**row, "skipped": ours["skipped"], "slowdown": None})
            continue
        slowdown = idle / ours[key]
        rows.append(
            {
                **row,
                "skipped": None,
                "contended_ratio": ours[key],
                "slowdown": slowdown,
                "within_target": slowdown <= CONTENDED_TARGET,
            }
        )
    slowdowns = [r["slowdown"] for r in rows if r["slowdown"] is not None]
    return {
        "variant": "gatelab_grouped",
        "definition": "(MoE/dense time, this contended run) / (MoE/dense time, idle "
        "baseline) = baseline ratio / this ratio, fwd+bwd on training shapes, fwd on decode",
        "target": CONTENDED_TARGET,
        "contended": contended,
        "baseline": {
            "command": baseline.get("command"),
            "started_at": baseline.get("started_at"),
            "load_average_1m": baseline.get("environment", {}).get("load_average_1m"),
        },
        "shapes": rows,
        "max_slowdown": max(slowdowns) if slowdowns else None,
        "met": all(s <= CONTENDED_TARGET for s in slowdowns) if slowdowns else None,
    }


# -- the baseline of --baseline ----------------------------------------------------------------


def load_baseline(path: str | Path) -> dict:
    """Read the JSON of an earlier ``gatelab bench moe`` run; ValueError naming --baseline
    when the file is missing or not JSON (its contents are checked by
    :func:`check_baseline`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"--baseline {path}: no such file; give the JSON an earlier idle "
            "`gatelab bench moe --json PATH` run wrote"
        ) from None
    except IsADirectoryError:
        raise ValueError(f"--baseline {path} is a directory; give the JSON file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--baseline {path} is not JSON ({error}); give the JSON an earlier "
            "`gatelab bench moe` run wrote"
        ) from None
    return data


def check_baseline(baseline: dict, shapes: Sequence[Shape], settings: BenchSettings) -> None:
    """A ValueError naming the fix unless ``baseline`` is an idle ``gatelab bench moe`` result
    with the same device and dtype that timed gatelab grouped on every one of ``shapes``,
    and this run is contended."""
    where = "--baseline"
    if not isinstance(baseline, dict) or baseline.get("schema") != SCHEMA:
        schema = baseline.get("schema") if isinstance(baseline, dict) else type(baseline).__name__
        raise ValueError(
            f"{where} is not a `gatelab bench moe` result (schema {schema!r}, expected "
            f"{SCHEMA!r}); give the JSON an earlier `gatelab bench moe --json PATH` run wrote"
        )
    if not settings.contended:
        raise ValueError(
            f"{where} compares a contended run with an idle one, but this run is idle; "
            "add --contended (or drop --baseline)"
        )
    try:
        base_settings = baseline["settings"]
        base_contended = baseline.get("contended", base_settings.get("contended", 0))
        base_shapes = {s["spec"]: s for s in baseline["shapes"]}
    except (KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{where} is malformed (no {error}); give the JSON an earlier `gatelab bench moe` "
            "run wrote, unedited"
        ) from None
    if base_contended:
        raise ValueError(
            f"{where} was run with --contended {base_contended}; the baseline must be an "
            "idle run: give the JSON of a run without --contended"
        )
    for key in ("device", "dtype"):
        if base_settings.get(key) != getattr(settings, key):
            raise ValueError(
                f"{where} ran on {key} {base_settings.get(key)!r}, this run on "
                f"{getattr(settings, key)!r}; give a baseline run with the same --{key}"
            )
    missing = [s for s in shapes if s.spec not in base_shapes]
    if missing:
        names = ", ".join(f"{s.name} ({s.spec})" for s in missing)
        raise ValueError(
            f"{where} has no result for shape(s) {names}; run the baseline with the same "
            "--set or --shapes, and --quick, as this run"
        )
    for shape in shapes:
        mode = "fwd" if shape.decode else "fwd_bwd"
        try:
            entry = base_shapes[shape.spec]["variants"]["gatelab_grouped"]
            ratio = None if entry["skipped"] is not None else entry[f"ratio_{mode}"]
        except (KeyError, TypeError) as error:
            raise ValueError(
                f"{where} is malformed at shape {shape.spec} (no {error}); give the JSON an "
                "earlier `gatelab bench moe` run wrote, unedited"
            ) from None
        if not (isinstance(ratio, (int, float)) and ratio > 0):
            raise ValueError(
                f"{where} did not time gatelab grouped on shape {shape.spec} "
                f"({entry.get('skipped') or 'no ratio'}); rerun the baseline"
            )


__all__ = [
    "COMPILED_VARIANTS",
    "CONTENDED_TARGET",
    "DECODE_TOKENS",
    "DTYPES",
    "LOOP_MAX_EXPERTS",
    "MOE_VARIANTS",
    "QUICK_LOOP_MAX_EXPERTS",
    "SCHEMA",
    "SHAPE_FORMAT",
    "SHAPE_SETS",
    "VARIANTS",
    "BenchSettings",
    "Shape",
    "Variant",
    "bench_shape",
    "check_baseline",
    "default_shapes",
    "format_table",
    "hf_available",
    "load_baseline",
    "parse_shape",
    "resolve_device",
    "resolve_shapes",
    "run_moe_bench",
    "shape_set",
    "skip_reason",
    "summarize",
    "triton_available",
]
