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

import importlib.util
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers import MoE
from .common import (
    copy_bandwidth,
    device_sync,
    environment,
    load_average,
    log_stderr,
    median,
    timeit,
    utc_now,
)

SCHEMA = "gatelab.bench.moe/1"

DECODE_TOKENS = 64
"""Shapes with at most this many tokens are small-batch (decode) shapes: they get a roofline."""

LOOP_MAX_EXPERTS = 256
"""Above this many experts the per-expert loops (gatelab loop, HF eager) are not timed."""

QUICK_LOOP_MAX_EXPERTS = 16
"""With --quick the per-expert loops are timed only up to this many experts."""

VARIANTS = (
    "dense",
    "gatelab_grouped",
    "gatelab_triton",
    "gatelab_loop",
    "hf_eager",
    "hf_grouped_mm",
)
MOE_VARIANTS = VARIANTS[1:]

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


# -- shapes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """One benchmark case: T tokens of width D through E experts of width F, k per token."""

    name: str
    tokens: int
    dim: int
    hidden_dim: int
    num_experts: int
    top_k: int

    def __post_init__(self) -> None:
        for attr in ("tokens", "dim", "hidden_dim", "num_experts", "top_k"):
            value = getattr(self, attr)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(
                    f"shape {self.name!r}: {attr} must be a positive int, got {value!r}"
                )
        if self.top_k > self.num_experts:
            raise ValueError(
                f"shape {self.name!r}: k={self.top_k} exceeds E={self.num_experts}; use k <= E"
            )

    @property
    def decode(self) -> bool:
        """A small-batch shape, bounded by reading weights rather than by FLOPs."""
        return self.tokens <= DECODE_TOKENS

    @property
    def spec(self) -> str:
        """The ``T,D,F,E,k`` form ``--shapes`` reads."""
        return f"{self.tokens},{self.dim},{self.hidden_dim},{self.num_experts},{self.top_k}"

    def describe(self) -> str:
        return (
            f"T={self.tokens} D={self.dim} F={self.hidden_dim} E={self.num_experts} k={self.top_k}"
        )

    def active_flops(self) -> int:
        """Forward FLOPs of the routed experts (= the dense baseline's): 6 * T * k * D * F."""
        return 6 * self.tokens * self.top_k * self.dim * self.hidden_dim


SHAPE_FORMAT = "T,D,F,E,k (five positive integers, k <= E), optionally prefixed by NAME="

_SHAPE_RE = re.compile(r"^(?:(?P<name>[A-Za-z_][\w.-]*)=)?(?P<dims>.*)$")


def parse_shape(text: str) -> Shape:
    """Parse ``"T,D,F,E,k"`` or ``"name=T,D,F,E,k"``; ValueError with the format otherwise."""
    match = _SHAPE_RE.match(text.strip())
    name, dims = (match["name"], match["dims"]) if match else (None, text)
    parts = [p.strip() for p in dims.split(",")]
    if len(parts) != 5:
        raise ValueError(
            f"bad shape {text!r}: expected {SHAPE_FORMAT}, e.g. 4096,512,1024,8,2 or "
            f"coarse=4096,512,1024,8,2; got {len(parts)} field(s)"
        )
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(
            f"bad shape {text!r}: expected {SHAPE_FORMAT}; {dims!r} holds a non-integer"
        ) from None
    if any(v < 1 for v in values):
        raise ValueError(f"bad shape {text!r}: T, D, F, E and k must all be >= 1")
    tokens, dim, hidden_dim, num_experts, top_k = values
    if top_k > num_experts:
        raise ValueError(f"bad shape {text!r}: k={top_k} exceeds E={num_experts}; use k <= E")
    return Shape(name or f"T{tokens}-E{num_experts}", tokens, dim, hidden_dim, num_experts, top_k)


DEFAULT_SHAPES: dict[tuple[str, bool], tuple[Shape, ...]] = {
    ("cpu", False): (
        Shape("coarse", 4096, 512, 1024, 8, 2),
        Shape("fine", 4096, 512, 256, 64, 8),
        Shape("decode", 8, 512, 1024, 8, 2),
    ),
    ("cpu", True): (
        Shape("coarse", 512, 512, 1024, 8, 2),
        Shape("fine", 512, 512, 256, 64, 8),
        Shape("decode", 8, 512, 1024, 8, 2),
    ),
    ("cuda", False): (
        Shape("mixtral", 8192, 4096, 14336, 8, 2),
        Shape("fine-64", 8192, 2048, 1024, 64, 8),
        Shape("fine-128", 8192, 2048, 512, 128, 8),
        Shape("decode", 16, 4096, 14336, 8, 2),
    ),
    ("cuda", True): (
        Shape("mixtral", 2048, 4096, 14336, 8, 2),
        Shape("fine-64", 2048, 2048, 1024, 64, 8),
        Shape("decode", 16, 4096, 14336, 8, 2),
    ),
}


def default_shapes(device: str, quick: bool) -> tuple[Shape, ...]:
    return DEFAULT_SHAPES[(torch.device(device).type, quick)]


# -- settings ---------------------------------------------------------------------------


@dataclass
class BenchSettings:
    """How to run: device, dtype (None: fp32 on CPU, bf16 on CUDA), warm-up and repeats
    (None: defaults by device and --quick), whether to run HF, and the copy-probe size."""

    device: str = "cpu"
    dtype: str | None = None
    warmup: int | None = None
    repeats: int | None = None
    quick: bool = False
    hf: bool = True
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


# -- the measured variants ----------------------------------------------------------------


@dataclass
class Variant:
    """Something to time: ``forward(x [T, D]) -> [T, D]`` and the parameters it trains."""

    forward: Callable[[Tensor], Tensor]
    params: list[Tensor] = field(default_factory=list)


def dense_mlp(shape: Shape, device: str, dtype: torch.dtype) -> Variant:
    """The equal-FLOP dense baseline: a SwiGLU MLP of hidden width k*F."""
    hidden = shape.top_k * shape.hidden_dim

    def init(rows: int, cols: int) -> nn.Parameter:
        bound = 1 / math.sqrt(cols)  # nn.Linear's default scale
        w = torch.empty(rows, cols, device=device, dtype=dtype).uniform_(-bound, bound)
        return nn.Parameter(w)

    gate_up, down = init(2 * hidden, shape.dim), init(shape.dim, hidden)

    def forward(x: Tensor) -> Tensor:
        gate, up = F.linear(x, gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, down)

    return Variant(forward, [gate_up, down])


def build_gatelab_moe(shape: Shape, device: str, dtype: torch.dtype) -> MoE:
    """gatelab's MoE with Mixtral routing (softmax, top-k, renormalised), grouped dispatch."""
    with torch.device(device):
        moe = MoE(
            shape.dim,
            shape.hidden_dim,
            shape.num_experts,
            shape.top_k,
            router="topk",
            router_kwargs={"normalize": True},
            dispatcher="grouped",
        )
    return moe.to(dtype).eval()


def gatelab_grouped(moe: MoE) -> Variant:
    """The layer as built: grouped dispatch (sort by expert, grouped GEMMs, combine)."""
    return Variant(moe, list(moe.parameters()))


def gatelab_loop(moe: MoE) -> Variant:
    """The same router and experts (shared parameters) through the loop dispatcher."""
    loop = MoE(
        moe.dim,
        moe.hidden_dim,
        moe.num_experts,
        moe.top_k,
        router=moe.router,
        experts=moe.experts,
        dispatcher="loop",
    ).eval()
    return Variant(loop, list(loop.parameters()))


def gatelab_triton(moe: MoE) -> Variant:
    """The same router and experts (shared parameters) through the triton dispatcher."""
    fused = MoE(
        moe.dim,
        moe.hidden_dim,
        moe.num_experts,
        moe.top_k,
        router=moe.router,
        experts=moe.experts,
        dispatcher="triton",
    ).eval()
    return Variant(fused, list(fused.parameters()))


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def hf_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def hf_block(moe: MoE, implementation: str) -> nn.Module:
    """A Mixtral MoE block that holds ``moe``'s own parameters, run by ``implementation``.

    The router weight [E, D] and the experts' ``gate_up_proj`` [E, 2F, D] (gate rows first)
    and ``down_proj`` [E, D, F] have the same layout in both libraries, so the block takes
    the very same Parameter objects: no copy, and gradients land in the same ``.grad``.
    """
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    config = MixtralConfig(
        hidden_size=moe.dim,
        intermediate_size=moe.hidden_dim,
        num_local_experts=moe.num_experts,
        num_experts_per_tok=moe.top_k,
        hidden_act="silu",
        router_jitter_noise=0.0,
        num_hidden_layers=1,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    config._experts_implementation = implementation
    with torch.device("meta"):  # allocate nothing: every parameter is replaced below
        block = MixtralSparseMoeBlock(config)
    block.gate.weight = moe.router.weight
    block.experts.gate_up_proj = moe.experts.gate_up_proj
    block.experts.down_proj = moe.experts.down_proj
    left = [n for n, t in [*block.named_parameters(), *block.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"MixtralSparseMoeBlock has tensors gatelab did not fill: {left}")
    return block.eval()


def hf_eager(moe: MoE) -> Variant:
    """HF's reference experts loop (``experts_implementation="eager"``)."""
    block = hf_block(moe, "eager")
    return Variant(lambda x: block(x.unsqueeze(0)).squeeze(0), list(block.parameters()))


def hf_grouped_mm(moe: MoE) -> Variant:
    """HF's default experts implementation: argsort + ``grouped_mm``."""
    block = hf_block(moe, "grouped_mm")
    return Variant(lambda x: block(x.unsqueeze(0)).squeeze(0), list(block.parameters()))


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
    sync = device_sync(device)
    torch.manual_seed(settings.seed)
    moe = build_gatelab_moe(shape, device, dtype)
    x = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(shape.tokens, shape.dim, device=device, dtype=dtype)

    builders: dict[str, Callable[[], Variant]] = {
        "dense": lambda: dense_mlp(shape, device, dtype),
        "gatelab_grouped": lambda: gatelab_grouped(moe),
        "gatelab_triton": lambda: gatelab_triton(moe),
        "gatelab_loop": lambda: gatelab_loop(moe),
        "hf_eager": lambda: hf_eager(moe),
        "hf_grouped_mm": lambda: hf_grouped_mm(moe),
    }
    hf_check = None
    if settings.hf and hf_available():
        hf_check = check_against_hf(moe, hf_eager(moe), x)
    skipped: dict[str, str] = {}
    variants: dict[str, Variant] = {}
    for name in VARIANTS:
        reason = skip_reason(name, shape, settings)
        if reason is None:
            variants[name] = builders[name]()
        else:
            skipped[name] = reason
            log(f"  {shape.name}: {name} skipped ({reason})")
    log(f"  {shape.name}: timing {', '.join(variants)} round-robin")
    timed = measure(variants, x, grad_out, settings.warmup, settings.repeats, sync)
    results = {
        name: {"skipped": skipped[name]} if name in skipped else {"skipped": None, **timed[name]}
        for name in VARIANTS
    }

    dense = results["dense"]
    for entry in results.values():
        if entry["skipped"] is None:
            entry["ratio_fwd"] = dense["fwd_s"] / entry["fwd_s"]
            entry["ratio_fwd_bwd"] = dense["fwd_bwd_s"] / entry["fwd_bwd_s"]

    roofline = None
    if shape.decode:
        roofline = decode_roofline(moe, x, bandwidth)
        for name in MOE_VARIANTS:
            entry = results[name]
            if entry["skipped"] is None:
                entry["roofline_fwd"] = roofline["seconds"] / entry["fwd_s"]

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


# -- the printed table ----------------------------------------------------------------------

_LABELS = {
    "dense": "dense (k*F)",
    "gatelab_grouped": "gatelab grouped",
    "gatelab_triton": "gatelab triton",
    "gatelab_loop": "gatelab loop",
    "hf_eager": "HF eager",
    "hf_grouped_mm": "HF grouped_mm",
}


def format_table(result: dict) -> str:
    """The result as a plain-text table: one block per shape, one row per variant."""
    env, settings = result["environment"], result["settings"]
    lines = [
        f"gatelab bench moe | {env['device_name']} | {settings['device']} {settings['dtype']} | "
        f"{env['threads']} threads | torch {env['torch']} | "
        f"transformers {env['transformers'] or '-'} | load average "
        f"{env.get('load_average_1m')} -> {env.get('load_average_1m_at_end')}",
        f"median of {settings['repeats']} after {settings['warmup']} warm-up; "
        "ratio = dense time / variant time (higher is better)",
    ]
    bandwidth = result.get("copy_bandwidth")
    if bandwidth:
        lines.append(
            f"copy bandwidth {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s "
            "(2 x bytes / time of a copy); roofline = weight bytes / bandwidth / forward time"
        )
    header = (
        f"  {'variant':<17}{'fwd ms':>10}{'fwd+bwd ms':>12}{'ratio fwd':>11}"
        f"{'ratio f+b':>11}{'roofline':>10}"
    )
    for shape in result["shapes"]:
        check, note = shape["hf_check"], ""
        if check is not None:
            diff = "non-finite" if check["max_abs_diff"] is None else f"{check['max_abs_diff']:.2e}"
            note = f" | vs HF eager max|diff| {diff} {'ok' if check['ok'] else 'MISMATCH'}"
        roof = shape["roofline"]
        if roof is not None:
            note += f" | {roof['distinct_experts']} experts touched"
        title = (
            f"{shape['name']}: T={shape['tokens']} D={shape['dim']} F={shape['hidden_dim']} "
            f"E={shape['num_experts']} k={shape['top_k']}{note}"
        )
        lines += ["", title, header]
        for name in VARIANTS:
            entry = shape["variants"][name]
            if entry["skipped"] is not None:
                lines.append(f"  {_LABELS[name]:<17}  skipped: {entry['skipped']}")
                continue
            roofline = entry.get("roofline_fwd")
            row = (
                f"  {_LABELS[name]:<17}{entry['fwd_s'] * 1e3:>10.2f}"
                f"{entry['fwd_bwd_s'] * 1e3:>12.2f}{entry['ratio_fwd']:>11.2f}"
                f"{entry['ratio_fwd_bwd']:>11.2f}"
            )
            lines.append(row if roofline is None else f"{row}{roofline:>10.2f}")
    return "\n".join(lines)
