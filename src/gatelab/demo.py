"""``gatelab demo``: an MoE LM against its dense equivalent on prose and code, on a laptop CPU.

What it does, in one process, within ``--minutes`` (default 10) on 2 CPU cores:

1. **Plan** (:func:`plan_run`): time a few training steps of each model, then pick one step
   count ``steps`` that fits both trainings into the budget, after setting aside the
   estimated evaluation time. Both runs are configured with that same ``steps``, so their
   warm-up + cosine schedules are identical. ``--steps N`` skips the timing and fixes N.
2. **Train both** (:func:`train_both`): the MoE LM (4 layers, width 256, 8 SwiGLU experts of
   width 512, top-2) and ``dense_equivalent`` of it (a SwiGLU FFN of width 2 * 512 per layer:
   the same active parameters, up to the routers), each in its own sub-directory
   (``moe/``, ``dense/``: ``metrics.jsonl``, ``routing.jsonl``, a checkpoint). Same seed,
   same optimizer settings, and the same batches in the same order (each run reads a fresh
   ``LMBatches`` with the same seed). Each run has a time cap as a safety net; if the MoE is
   stopped by it at step n, the dense run is stopped at step n too (its data ends there), so
   the two always see the same tokens.
3. **Evaluate** (:func:`evaluate`): validation cross entropy in bits per byte per domain,
   ``sum(nats) / (tokens * ln 2)`` over the first ``eval_batches`` batches of each domain's
   validation stream (``EvalBatches``, deterministic; each document's closing EOS counts as
   one byte of its document's domain).
4. **Profile** (:func:`profile_moe`): run the trained MoE over the same validation batches
   and count, per layer, the routed slots (top-k slots holding an expert) each expert gets
   from prose tokens and from code tokens (:func:`count_routing`). Shares are the counts
   divided by the domain's total, so each domain's row sums to 1. The specialisation score
   of a layer (:func:`specialisation`) is the Jensen-Shannon divergence, in bits, between the
   prose and code expert distributions: 0 when both domains use the experts alike, 1 when
   they use disjoint experts. The untrained model (same seed) is profiled too, as the
   reference: routing depends on the bytes even at initialisation.
5. **Plots and report** (:func:`make_plots`, :func:`write_report`): ``loss_curves.png``,
   ``expert_domain_heatmap.png``, ``expert_load.png``, ``report.md`` and ``summary.json`` (every
   number) in the run directory, and a short table on the terminal (:func:`format_summary`).

The run directory: created if missing; an error before any training when it cannot be
written. One that already holds a demo's outputs is an error unless ``--force``, which
removes only those outputs (``moe/``, ``dense/``, the report, the summary and the plots) and
nothing else in the directory.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .data.text import DOMAINS, EvalBatches, LMBatch, LMBatches, TextCorpus, load_corpus
from .io import atomic_write
from .models.config import MoEConfig
from .models.lm import LM, LMConfig, dense_equivalent
from .train import TrainConfig, Trainer, TrainResult, param_groups, read_jsonl
from .train.evaluate import bits_per_byte

__all__ = [
    "DemoError",
    "DemoSettings",
    "add_demo_arguments",
    "count_routing",
    "demo_settings",
    "evaluate",
    "format_summary",
    "make_plots",
    "plan_run",
    "profile_moe",
    "routing_shares",
    "run_demo",
    "specialisation",
    "train_both",
    "write_report",
]

MODELS = ("moe", "dense")
PLOTS = {
    "loss": "loss_curves.png",
    "heatmap": "expert_domain_heatmap.png",
    "load": "expert_load.png",
}
OUTPUTS = (*MODELS, "report.md", "summary.json", *PLOTS.values())
PLOTS_HINT = "pip install 'gatelab[plots]'"
CORPUS_SEED = 0  # the train/validation split is fixed; --seed changes init and data order


class DemoError(RuntimeError):
    """The demo cannot run as asked; the message says what to change."""


# -- settings ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """The model and training settings of a demo (the same for both models)."""

    model: LMConfig
    seq_len: int
    batch_size: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    warmup_fraction: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0

    def train_config(self, steps: int, seed: int, run_dir: Path, **kw: Any) -> TrainConfig:
        return TrainConfig(
            steps=steps,
            lr=self.lr,
            weight_decay=self.weight_decay,
            warmup_steps=round(self.warmup_fraction * steps),
            min_lr_ratio=self.min_lr_ratio,
            grad_clip=self.grad_clip,
            seed=seed,
            run_dir=str(run_dir),
            routing_every=max(1, steps // 100),
            **kw,
        )


def demo_settings(tiny: bool = False) -> DemoSettings:
    """The demo's settings; ``tiny`` gives a model that trains in milliseconds (for tests).

    The full model: 4 layers, width 256, 4 heads, 8 experts of width 512, top-2, the byte
    vocabulary (257 ids), sequences of 128 bytes in batches of 16 (2,048 tokens a step; on 2
    CPU cores as fast per token as 256 x 8 and twice the windows per step).
    """
    if tiny:
        model = LMConfig(
            vocab_size=257,
            dim=32,
            num_layers=2,
            num_heads=2,
            max_seq_len=32,
            moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=32),
            ffn_hidden_dim=64,
        )
        return DemoSettings(model, seq_len=32, batch_size=4)
    model = LMConfig(vocab_size=257, max_seq_len=128)
    return DemoSettings(model, seq_len=128, batch_size=16)


def default_eval_batches(minutes: float) -> int:
    """Validation batches per domain: 3 a minute (30 = 61k tokens at 10 minutes), at least 2."""
    return max(2, round(3 * minutes))


# -- command line ----------------------------------------------------------------------------


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a{'n integer' if kind is int else ' number'}, got {text!r}"
            ) from None
        if not value > 0 or (kind is float and not math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    parse.__name__ = f"positive {kind.__name__}"
    return parse


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the options of ``gatelab demo`` on ``parser``."""
    parser.add_argument(
        "--minutes",
        type=_positive(float),
        default=10.0,
        help="wall-clock budget for the whole demo; the training length scales with it "
        "(default: 10)",
    )
    parser.add_argument(
        "--run-dir",
        default="runs/demo",
        help="where the runs, plots, report.md and summary.json go (default: runs/demo)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the initialisation and the data order (the train/validation split is "
        "fixed) (default: 0)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite the demo outputs already in --run-dir (only those are removed)",
    )
    parser.add_argument(
        "--steps",
        type=_positive(int),
        default=None,
        help="train both models for exactly this many steps instead of timing a few steps "
        "and fitting the step count to --minutes (use it to reproduce a run exactly)",
    )
    parser.add_argument(
        "--eval-batches",
        type=_positive(int),
        default=None,
        help="validation batches per domain (default: 3 per minute of --minutes, at least 2)",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="a tiny model and short sequences: checks the pipeline in seconds (for tests)",
    )
    parser.add_argument(
        "--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)"
    )


def run_demo(args: argparse.Namespace) -> int:
    """Run ``gatelab demo`` with parsed ``args``; 0 on success, 2 on a usage error, 130 on
    Ctrl-C."""
    try:
        summary = _run(args)
    except DemoError as error:
        print(f"gatelab demo: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("gatelab demo: interrupted", file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


def reproduce_command(args: argparse.Namespace, steps: int, eval_batches: int) -> str:
    """The command that repeats this run's numbers: the options given, with the planned step
    count and validation batches fixed."""
    parts = ["gatelab", "demo", "--minutes", f"{args.minutes:g}", "--seed", str(args.seed)]
    parts += ["--steps", str(steps), "--eval-batches", str(eval_batches)]
    parts += ["--run-dir", str(args.run_dir)]
    parts += [flag for flag, on in (("--tiny", args.tiny), ("--no-plots", args.no_plots)) if on]
    return shlex.join([*parts, "--force"])


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    budget_s = args.minutes * 60.0
    if not args.no_plots:
        _require_matplotlib()
    run_dir = prepare_run_dir(Path(args.run_dir), force=args.force)
    settings = demo_settings(tiny=args.tiny)
    eval_batches = args.eval_batches or default_eval_batches(args.minutes)
    corpus = load_corpus(seed=CORPUS_SEED)
    eval_sets = validation_batches(corpus, settings, eval_batches)
    stages: dict[str, float] = {}

    t = time.perf_counter()
    plan = plan_run(settings, args.seed, budget_s, eval_sets, start, steps=args.steps)
    stages["plan_s"] = time.perf_counter() - t
    _say(
        f"training each model for {plan['steps']} steps of {settings.batch_size} x "
        f"{settings.seq_len} tokens"
        + (
            f" (timed: MoE {plan['moe_step_s']:.3f} s/step, dense {plan['dense_step_s']:.3f} "
            f"s/step, for a {budget_s:g} s budget)"
            if plan["timed"]
            else ""
        )
    )

    t = time.perf_counter()
    torch.manual_seed(args.seed)
    init_profile = profile_moe(LM(settings.model), eval_sets)  # the reference: untrained
    stages["init_profile_s"] = time.perf_counter() - t
    t = time.perf_counter()
    models, runs = train_both(settings, plan, args.seed, run_dir, corpus)
    stages["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    _say("evaluating on the validation batches")
    val = {name: evaluate(model, eval_sets) for name, model in models.items()}
    stages["evaluate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    _say("profiling the MoE's routing by domain")
    profile = profile_moe(models["moe"], eval_sets)
    for layer, init in zip(profile, init_profile, strict=True):
        layer["at_init"] = {key: init[key] for key in ("shares", "jsd_bits", "total_variation")}
    stages["profile_s"] = time.perf_counter() - t

    summary = build_summary(
        args, settings, plan, models, runs, val, profile, eval_sets, corpus.stats()
    )
    summary["command"] = reproduce_command(args, plan["steps"], eval_batches)
    summary["run_dir"] = str(run_dir)
    if not args.no_plots:
        t = time.perf_counter()
        summary["plots"] = make_plots(run_dir, summary)
        stages["plots_s"] = time.perf_counter() - t
    stages["total_s"] = time.perf_counter() - start
    summary["timing"] = {**stages, "budget_s": budget_s}
    write_report(run_dir, summary)
    atomic_write(run_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode())
    return summary


# -- run directory ---------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, force: bool = False) -> Path:
    """Create ``run_dir`` and check it is writable; clear earlier demo outputs only with
    ``force``. Raises :class:`DemoError` before anything is trained."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise DemoError(
            f"run directory {run_dir} is not writable ({error.strerror or error}); pass "
            "another --run-dir or fix its permissions"
        ) from None
    existing = [name for name in OUTPUTS if (run_dir / name).exists()]
    if existing and not force:
        raise DemoError(
            f"{run_dir} already holds a demo run ({', '.join(existing)}); pass --force to "
            "overwrite it, or another --run-dir"
        )
    for name in existing:
        path = run_dir / name
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as error:
            raise DemoError(f"cannot remove the old {path} ({error.strerror or error})") from None
    return run_dir


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise DemoError(f"the plots need matplotlib: {PLOTS_HINT} (or pass --no-plots)") from None


# -- data --------------------------------------------------------------------------------------


def validation_batches(
    corpus: TextCorpus, settings: DemoSettings, eval_batches: int
) -> dict[str, list[LMBatch]]:
    """The first ``eval_batches`` batches of each domain's validation stream (fewer when the
    domain's validation split is shorter), built once so both models see the same ones."""
    return {
        domain: list(
            EvalBatches(
                corpus,
                "val",
                seq_len=settings.seq_len,
                batch_size=settings.batch_size,
                domain=domain,
                max_batches=eval_batches,
            )
        )
        for domain in DOMAINS
    }


def train_batches(corpus: TextCorpus, settings: DemoSettings, seed: int) -> LMBatches:
    return LMBatches(
        corpus, "train", seq_len=settings.seq_len, batch_size=settings.batch_size, seed=seed
    )


class StopAfter:
    """At most ``limit`` batches of a resumable iterator, then ``StopIteration`` (the trainer
    stops with "data_exhausted"): ends a run at a given step without changing its schedule."""

    def __init__(self, batches: LMBatches, limit: int):
        self.batches, self.limit, self.served = batches, limit, 0

    def __iter__(self) -> Iterator[LMBatch]:
        return self

    def __next__(self) -> LMBatch:
        if self.served >= self.limit:
            raise StopIteration
        self.served += 1
        return next(self.batches)

    def state_dict(self) -> dict:
        return {**self.batches.state_dict(), "served": self.served}

    def load_state_dict(self, state: dict) -> None:
        state = dict(state)
        self.served = int(state.pop("served", 0))
        self.batches.load_state_dict(state)


# -- 1. plan --------------------------------------------------------------------------------


def time_steps(config: LMConfig, settings: DemoSettings, seed: int, steps: int = 3) -> float:
    """Median seconds of one training step (forward, backward, clip, AdamW) of ``LM(config)``
    on random bytes, after one untimed warm-up step. The model is thrown away."""
    torch.manual_seed(seed)
    model = LM(config)
    opt = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=settings.lr)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 256, (settings.batch_size, settings.seq_len + 1), generator=gen)
    times = []
    for i in range(steps + 1):
        t = time.perf_counter()
        out = model(ids[:, :-1], ids[:, 1:])
        (out.loss + out.aux_loss).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def plan_run(
    settings: DemoSettings,
    seed: int,
    budget_s: float,
    eval_sets: dict[str, list[LMBatch]],
    start: float,
    steps: int | None = None,
) -> dict[str, Any]:
    """The step count both models train for, and each run's time cap.

    Without ``steps``: time a few steps of each model, estimate the evaluation and profiling
    (3 forward passes of the MoE: untrained, evaluation, profile; 1 of the dense model, over every validation batch; a
    forward costs about a third of a training step) plus a small reserve for plots and
    checkpoints, and fit ``steps * (moe_step + dense_step)`` into what is left of the budget.
    Each run is capped at 1.3x its share as a safety net (the demo stays near its budget on a
    machine that slows down). With ``steps``: no timing, no caps.
    """
    if steps is not None:
        return {"steps": steps, "timed": False, "moe_step_s": None, "dense_step_s": None}
    moe_s = time_steps(settings.model, settings, seed)
    dense_s = time_steps(dense_equivalent(settings.model), settings, seed)
    num_eval = sum(len(batches) for batches in eval_sets.values())
    eval_s = num_eval * (3 * moe_s + dense_s) / 3
    reserve_s = max(5.0, 0.03 * budget_s)
    train_s = budget_s - (time.perf_counter() - start) - eval_s - reserve_s
    # Measured on 2 cores: inside the trainer (logging, routing telemetry, the final
    # checkpoint) and on real bytes a step takes ~10% longer than the bare timed step.
    overhead = 1.12
    if train_s < (moe_s + dense_s) * overhead:
        _say(f"warning: a {budget_s:g} s budget leaves no time to train; training 1 step")
    planned = max(1, int(train_s / ((moe_s + dense_s) * overhead)))
    return {
        "steps": planned,
        "timed": True,
        "moe_step_s": moe_s,
        "dense_step_s": dense_s,
        "eval_estimate_s": eval_s,
        "train_budget_s": max(train_s, 0.0),
        "moe_cap_s": 1.3 * planned * moe_s * overhead + 5.0,
        "dense_cap_s": 1.3 * planned * dense_s * overhead + 5.0,
    }


# -- 2. train ---------------------------------------------------------------------------------


def _lm_forward(model: LM, batch: LMBatch):
    return model(batch.inputs, batch.targets)  # the third field is domains, not a token mask


def train_one(
    name: str,
    config: LMConfig,
    settings: DemoSettings,
    plan: dict[str, Any],
    seed: int,
    run_dir: Path,
    corpus: TextCorpus,
    max_steps: int | None = None,
) -> tuple[LM, TrainResult]:
    """Build ``LM(config)`` from ``seed`` and train it in ``run_dir / name``."""
    torch.manual_seed(seed)
    model = LM(config)
    data: LMBatches | StopAfter = train_batches(corpus, settings, seed)
    if max_steps is not None and max_steps < plan["steps"]:
        data = StopAfter(data, max_steps)
    cfg = settings.train_config(
        plan["steps"],
        seed,
        run_dir / name,
        time_budget_s=plan.get(f"{name}_cap_s"),
        keep_checkpoints=1,
        verbose=False,
    )
    run_config = {
        "model": config.to_dict(),
        "data": {"seq_len": settings.seq_len, "batch_size": settings.batch_size, "seed": seed},
    }
    trainer = Trainer(model, data, cfg, config=run_config, forward=_lm_forward)
    result = trainer.fit()
    if result.stopped == "interrupted":
        raise KeyboardInterrupt
    return model, result


def train_both(
    settings: DemoSettings, plan: dict[str, Any], seed: int, run_dir: Path, corpus: TextCorpus
) -> tuple[dict[str, LM], dict[str, TrainResult]]:
    """Train the MoE, then the dense model for the steps the MoE reached (see the module
    docstring); both in eval mode afterwards."""
    models, runs = {}, {}
    configs = {"moe": settings.model, "dense": dense_equivalent(settings.model)}
    for name in MODELS:
        limit = runs["moe"].step if name == "dense" else None
        _say(f"training the {'MoE' if name == 'moe' else 'dense'} LM in {run_dir / name}")
        model, result = train_one(name, configs[name], settings, plan, seed, run_dir, corpus, limit)
        rate = result_tokens(run_dir / name) / max(result.elapsed_s, 1e-9)
        loss = "" if result.loss is None else f", last loss {result.loss:.4f} nats/byte"
        _say(f"  {result.step} steps in {result.elapsed_s:.1f} s ({rate:,.0f} tokens/s){loss}")
        models[name], runs[name] = model.eval(), result
    if runs["dense"].step != runs["moe"].step:
        _say(
            f"warning: the dense run stopped at step {runs['dense'].step} "
            f"({runs['dense'].stopped}), the MoE at {runs['moe'].step}: unequal tokens"
        )
    return models, runs


def result_tokens(run_dir: Path) -> int:
    """Tokens trained on, from the last train record of ``run_dir/metrics.jsonl``."""
    records = read_jsonl(run_dir / "metrics.jsonl", kind="train")
    return int(records[-1]["tokens"]) if records else 0


# -- 3. evaluate ------------------------------------------------------------------------------


def evaluate(model: LM, eval_sets: dict[str, list[LMBatch]]) -> dict[str, dict[str, float]]:
    """Bits per byte and target count per domain over all the validation batches
    (:func:`gatelab.train.evaluate.bits_per_byte`: summed cross entropy in nats /
    (targets * ln 2), one byte per target, EOS included, each target with its domain)."""
    return bits_per_byte(model, itertools.chain.from_iterable(eval_sets.values()))


# -- 4. profile -------------------------------------------------------------------------------


def count_routing(experts: torch.Tensor, domains: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[len(DOMAINS), E] int64: routed slots per (domain, expert).

    experts: [T, K] a Routing's expert ids (-1: empty slot, not counted).
    domains: [T] domain id of each token (-1: padding, not counted).
    """
    if experts.dim() != 2 or domains.shape != experts.shape[:1]:
        raise ValueError(
            f"count_routing takes experts [T, K] and domains [T], got {tuple(experts.shape)} "
            f"and {tuple(domains.shape)}"
        )
    domains = domains.to(experts.device).long()
    slot_domain = domains[:, None].expand_as(experts)
    valid = (experts >= 0) & (slot_domain >= 0)
    index = slot_domain[valid] * num_experts + experts[valid]
    counts = torch.bincount(index, minlength=len(DOMAINS) * num_experts)
    return counts.view(len(DOMAINS), num_experts).cpu()


def routing_shares(counts: torch.Tensor) -> torch.Tensor:
    """counts [D, E] -> shares [D, E] float64, each row divided by its sum (zeros if none)."""
    counts = counts.double()
    return counts / counts.sum(dim=1, keepdim=True).clamp_min(1)


def specialisation(shares: torch.Tensor) -> dict[str, float]:
    """How differently two domains use the experts, from their share rows p, q.

    ``jsd_bits``: Jensen-Shannon divergence in bits, JSD = (KL(p||m) + KL(q||m)) / 2 with
    m = (p + q) / 2; in [0, 1], 0 for identical distributions, 1 for disjoint experts.
    ``total_variation``: sum |p - q| / 2 = the share of slots that would have to move for the
    domains to match; also in [0, 1].
    """
    p, q = shares[0].double(), shares[1].double()
    m = (p + q) / 2

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum()) / math.log(2)

    return {
        "jsd_bits": max(0.0, (kl(p, m) + kl(q, m)) / 2),
        "total_variation": float((p - q).abs().sum() / 2),
    }


@torch.no_grad()
def profile_moe(model: LM, eval_sets: dict[str, list[LMBatch]]) -> list[dict[str, Any]]:
    """Per MoE layer: routed-slot counts and shares by domain and the specialisation scores.

    Runs the model over ``eval_sets`` and reads each MoE layer's ``last_routing`` after every
    forward; a token's domain is that of its target (the same within a document; -1 marks
    padding, which is skipped).
    """
    model.eval()
    layers = model.moe_layers()
    totals = {
        name: torch.zeros(len(DOMAINS), layer.num_experts, dtype=torch.int64)
        for name, layer in layers.items()
    }
    for batches in eval_sets.values():
        for batch in batches:
            model(batch.inputs)
            for name, layer in layers.items():
                routing = layer.last_routing
                totals[name] += count_routing(
                    routing.experts, batch.domains.reshape(-1), layer.num_experts
                )
    profile = []
    for index, (name, counts) in enumerate(totals.items()):
        shares = routing_shares(counts)
        profile.append(
            {
                "layer": index,
                "name": name,
                "counts": {d: counts[i].tolist() for i, d in enumerate(DOMAINS)},
                "shares": {d: shares[i].tolist() for i, d in enumerate(DOMAINS)},
                **specialisation(shares),
            }
        )
    return profile


# -- summary ------------------------------------------------------------------------------------


def _run_numbers(model: LM, result: TrainResult, run_dir: Path) -> dict[str, Any]:
    tokens = result_tokens(run_dir)
    return {
        "parameters": model.num_parameters(),
        "active_parameters": model.num_active_parameters(),
        "steps": result.step,
        "stopped": result.stopped,
        "tokens": tokens,
        "train_s": result.elapsed_s,
        "tokens_per_s": tokens / result.elapsed_s if result.elapsed_s > 0 else math.nan,
        "final_train_loss": result.loss,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }


def build_summary(
    args: argparse.Namespace,
    settings: DemoSettings,
    plan: dict[str, Any],
    models: dict[str, LM],
    runs: dict[str, TrainResult],
    val: dict[str, dict[str, dict[str, float]]],
    profile: list[dict[str, Any]],
    eval_sets: dict[str, list[LMBatch]],
    corpus_stats: dict[str, Any],
) -> dict[str, Any]:
    """Every number of the demo, JSON-able."""
    run_dir = Path(args.run_dir)
    out: dict[str, Any] = {
        "gatelab_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "minutes": args.minutes,
        "tiny": bool(args.tiny),
        "settings": {
            "seq_len": settings.seq_len,
            "batch_size": settings.batch_size,
            "lr": settings.lr,
            "weight_decay": settings.weight_decay,
            "warmup_steps": round(settings.warmup_fraction * plan["steps"]),
            "min_lr_ratio": settings.min_lr_ratio,
            "grad_clip": settings.grad_clip,
            "corpus_seed": CORPUS_SEED,
        },
        "plan": plan,
        "corpus": corpus_stats,
        "eval_batches": {d: len(b) for d, b in eval_sets.items()},
        "models": {},
        "profile": profile,
    }
    for name in MODELS:
        numbers = _run_numbers(models[name], runs[name], run_dir / name)
        numbers["config"] = models[name].config.to_dict()
        numbers["val"] = val[name]
        out["models"][name] = numbers
    out["same_tokens"] = out["models"]["moe"]["tokens"] == out["models"]["dense"]["tokens"]
    return out


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def format_summary(summary: dict[str, Any]) -> str:
    """The terminal table: bits per byte per domain for both models, specialisation per layer,
    where the report is."""
    moe, dense = summary["models"]["moe"], summary["models"]["dense"]
    width = 30
    lines = [
        "",
        f"{'validation bits per byte':<{width}}" + "".join(f"{d:>9}" for d in DOMAINS),
    ]
    for label, run in (("MoE", moe), ("dense", dense)):
        name = (
            f"{label} ({_fmt_params(run['active_parameters'])} active / "
            f"{_fmt_params(run['parameters'])})"
        )
        lines.append(
            f"{name:<{width}}" + "".join(f"{run['val'][d]['bits_per_byte']:>9.4f}" for d in DOMAINS)
        )
    lines.append(
        f"{'MoE - dense':<{width}}"
        + "".join(
            f"{moe['val'][d]['bits_per_byte'] - dense['val'][d]['bits_per_byte']:>+9.4f}"
            for d in DOMAINS
        )
    )
    lines.append(
        f"\ntrained {moe['steps']} steps, {moe['tokens']:,} tokens each; "
        f"MoE {moe['tokens_per_s']:,.0f} tokens/s, dense {dense['tokens_per_s']:,.0f} tokens/s"
    )
    lines.append(
        "\nspecialisation: JSD(prose, code) of the expert shares, bits (0 = same, 1 = disjoint)"
    )
    for layer in summary["profile"]:
        lines.append(
            f"  layer {layer['layer']}: {layer['jsd_bits']:.3f} (at init "
            f"{layer['at_init']['jsd_bits']:.3f})   total variation {layer['total_variation']:.3f}"
        )
    timing = summary.get("timing", {})
    if "total_s" in timing:
        lines.append(f"\nwall time {timing['total_s']:.0f} s (budget {timing['budget_s']:.0f} s)")
    lines.append(f"report: {Path(summary['run_dir']) / 'report.md'}")
    return "\n".join(lines)


# -- 5. plots ------------------------------------------------------------------------------------


def _smooth(values: Sequence[float], span: int) -> list[float]:
    """Exponential moving average with the given span (bias-corrected at the start)."""
    alpha = 2.0 / (span + 1)
    out, avg, weight = [], 0.0, 0.0
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(avg / weight)
    return out


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


COLORS = {"moe": "tab:orange", "dense": "tab:blue"}
LABELS = {"moe": "MoE", "dense": "dense"}


def plot_losses(run_dir: Path, summary: dict[str, Any], path: Path) -> None:
    """Training loss (bits per byte, raw and smoothed) vs tokens, the smoothed difference
    MoE - dense at equal steps, and validation bits per byte per domain as points."""
    fig = _figure(14, 4.2)
    curve, diff_ax, val_ax = fig.subplots(1, 3, width_ratios=[2, 1.4, 1])
    bits_at: dict[str, dict[int, tuple[float, float]]] = {}
    for name in MODELS:
        records = read_jsonl(run_dir / name / "metrics.jsonl", kind="train")
        bits_at[name] = {r["step"]: (r["tokens"] / 1e6, r["loss"] / math.log(2)) for r in records}
        tokens = [r["tokens"] / 1e6 for r in records]
        bits = [r["loss"] / math.log(2) for r in records]
        span = max(1, len(bits) // 25)
        curve.plot(tokens, bits, color=COLORS[name], alpha=0.25, linewidth=0.8)
        curve.plot(tokens, _smooth(bits, span), color=COLORS[name], label=LABELS[name])
    curve.set(
        xlabel="training tokens (millions)",
        ylabel="training loss (bits per byte)",
        yscale="log",
        title="Training loss (both domains; thin: per step, thick: smoothed)",
    )
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda value, _: f"{value:g}")
    curve.yaxis.set_major_formatter(plain)
    curve.yaxis.set_minor_formatter(plain)
    curve.grid(alpha=0.3, which="both")
    curve.legend()
    steps = sorted(set(bits_at["moe"]) & set(bits_at["dense"]))
    if steps:
        gap = [bits_at["moe"][s][1] - bits_at["dense"][s][1] for s in steps]
        diff_ax.plot(
            [bits_at["moe"][s][0] for s in steps],
            _smooth(gap, max(1, len(gap) // 10)),
            color="tab:purple",
        )
    diff_ax.axhline(0.0, color="black", linewidth=0.8)
    diff_ax.set(
        xlabel="training tokens (millions)",
        ylabel="bits per byte",
        title="MoE - dense training loss (smoothed; < 0: MoE lower)",
    )
    diff_ax.grid(alpha=0.3)
    # Points, not bars: the differences are small next to the values, and bars must start at 0.
    for offset, name in ((-0.08, "moe"), (0.08, "dense")):
        values = [summary["models"][name]["val"][d]["bits_per_byte"] for d in DOMAINS]
        xs = [i + offset for i in range(len(DOMAINS))]
        val_ax.plot(xs, values, "o", color=COLORS[name], markersize=9, label=LABELS[name])
        for x, v in zip(xs, values, strict=True):
            side = "right" if name == "moe" else "left"
            nudge = -0.07 if name == "moe" else 0.07
            val_ax.annotate(f"{v:.3f}", (x + nudge, v), ha=side, va="center", fontsize=8)
    val_ax.set_xticks(range(len(DOMAINS)), list(DOMAINS))
    val_ax.set_xlim(-0.6, len(DOMAINS) - 0.4)
    val_ax.margins(y=0.15)
    val_ax.grid(axis="y", alpha=0.3)
    val_ax.set(ylabel="bits per byte", title="Validation loss by domain")
    val_ax.legend()
    fig.savefig(path)


def plot_heatmap(summary: dict[str, Any], path: Path) -> None:
    """Per layer: the share of each domain's routed slots that each expert receives."""
    profile = summary["profile"]
    num_experts = len(profile[0]["shares"][DOMAINS[0]])
    fig = _figure(max(6.0, 0.75 * num_experts + 2.5), 1.15 * len(profile) + 1.0)
    axes = fig.subplots(len(profile), 1, squeeze=False)[:, 0]
    vmax = max(max(layer["shares"][d]) for layer in profile for d in DOMAINS)
    image = None
    for ax, layer in zip(axes, profile, strict=True):
        shares = [layer["shares"][d] for d in DOMAINS]
        image = ax.imshow(shares, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        for i, row in enumerate(shares):
            for e, value in enumerate(row):
                color = "black" if value > 0.6 * vmax else "white"
                ax.text(e, i, f"{value:.2f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_yticks(range(len(DOMAINS)), list(DOMAINS))
        ax.set_xticks(range(num_experts), [str(e) for e in range(num_experts)])
        ax.set_title(
            f"layer {layer['layer']}: JSD {layer['jsd_bits']:.3f} bits "
            f"(at init {layer['at_init']['jsd_bits']:.3f})",
            fontsize=9,
        )
    axes[-1].set_xlabel("expert")
    fig.suptitle("Share of each domain's routed slots per expert (rows sum to 1)")
    fig.colorbar(image, ax=list(axes), label="share", shrink=0.8)
    fig.savefig(path)


def plot_expert_load(run_dir: Path, path: Path) -> None:
    """Per layer: each expert's share of the routed slots over training (routing.jsonl)."""
    records = read_jsonl(run_dir / "moe" / "routing.jsonl")
    names = list(records[0]["layers"]) if records else []
    fig = _figure(11, 2.4 * max(1, math.ceil(len(names) / 2)) + 0.6)
    cols = 2 if len(names) > 1 else 1
    rows = max(1, math.ceil(len(names) / cols))
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True, sharey=True).ravel()
    for ax, name in zip(axes, names, strict=False):
        steps = [r["step"] for r in records if name in r["layers"]]
        loads = [r["layers"][name]["load_share"] for r in records if name in r["layers"]]
        num_experts = len(loads[0])
        span = max(1, len(loads) // 20)
        for e in range(num_experts):
            share = _smooth([load[e] for load in loads], span)
            ax.plot(steps, share, linewidth=1.2, label=f"expert {e}")
        ax.axhline(1 / num_experts, color="black", linestyle="--", linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    for ax in axes[(rows - 1) * cols :]:
        ax.set_xlabel("step")
    for ax in axes[::cols]:
        ax.set_ylabel("load share")
    if names:
        handles, labels = axes[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="outside right center", fontsize=8)
    fig.suptitle(
        "Expert load over training: share of routed slots, smoothed over ~5% of the run "
        "(dashed: even, 1/E)"
    )
    fig.savefig(path)


def make_plots(run_dir: Path, summary: dict[str, Any]) -> dict[str, str]:
    """Write the three PNGs (Agg canvas, no pyplot state); returns {kind: file name}."""
    _require_matplotlib()
    plot_losses(run_dir, summary, run_dir / PLOTS["loss"])
    plot_heatmap(summary, run_dir / PLOTS["heatmap"])
    plot_expert_load(run_dir, run_dir / PLOTS["load"])
    return dict(PLOTS)


# -- 6. report ------------------------------------------------------------------------------------


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines


def write_report(run_dir: Path, summary: dict[str, Any]) -> Path:
    """``run_dir/report.md``: the numbers, the plots and the command that reproduces them."""
    moe, dense = summary["models"]["moe"], summary["models"]["dense"]
    s, plan = summary["settings"], summary["plan"]
    cfg = moe["config"]
    plots = summary.get("plots", {})
    train = {
        d: f"{c['bytes'] / 1e6:.2f} MB in {c['documents']} documents"
        for d, c in summary["corpus"]["train"].items()
    }
    lines = [
        "# gatelab demo: an MoE language model against its dense equivalent",
        "",
        f"A byte-level MoE LM ({cfg['num_layers']} layers, width {cfg['dim']}, "
        f"{cfg['moe']['num_experts']} experts of width {cfg['moe']['hidden_dim']}, "
        f"top-{cfg['moe']['top_k']}) "
        f"and the dense LM with the same active parameters (a SwiGLU FFN of width "
        f"{dense['config']['ffn_hidden_dim']}), trained on the same {moe['tokens']:,} tokens "
        "(same seed, same batches in the same order, same optimizer and schedule) of a "
        f"two-domain corpus: English prose (Python's documentation topics, {train['prose']}) "
        f"and Python source (the standard library's modules, {train['code']}).",
        "",
        "## Validation loss (bits per byte)",
        "",
    ]
    rows = []
    for label, run in (("MoE", moe), ("dense", dense)):
        rows.append(
            [
                label,
                f"{run['parameters']:,}",
                f"{run['active_parameters']:,}",
                *(f"{run['val'][d]['bits_per_byte']:.4f}" for d in DOMAINS),
            ]
        )
    rows.append(
        [
            "MoE - dense",
            "",
            "",
            *(
                f"{moe['val'][d]['bits_per_byte'] - dense['val'][d]['bits_per_byte']:+.4f}"
                for d in DOMAINS
            ),
        ]
    )
    lines += _table(["model", "parameters", "active parameters", *DOMAINS], rows)
    val_tokens = ", ".join(f"{moe['val'][d]['tokens']:,} {d}" for d in DOMAINS)
    lines += [
        "",
        f"Cross entropy in nats / ln 2 per target byte over the first "
        f"{', '.join(f'{n} {d}' for d, n in summary['eval_batches'].items())} validation "
        f"batches ({val_tokens} targets; each document's closing EOS counts as a byte of its "
        "domain). The validation documents are held out by document; the same batches score "
        "both models.",
        "",
        "## Training",
        "",
    ]
    lines += _table(
        [
            "model",
            "steps",
            "tokens",
            "train time (s)",
            "tokens/s",
            "last train loss (bits/byte)",
            "ended",
        ],
        [
            [
                label,
                run["steps"],
                f"{run['tokens']:,}",
                f"{run['train_s']:.1f}",
                f"{run['tokens_per_s']:,.0f}",
                _bits(run["final_train_loss"]),
                STOPPED.get(run["stopped"], run["stopped"]),
            ]
            for label, run in (("MoE", moe), ("dense", dense))
        ],
    )
    if plan["timed"]:
        how = (
            f"The step count was fitted to the budget: a few timed steps gave "
            f"{plan['moe_step_s']:.3f} s/step (MoE) and {plan['dense_step_s']:.3f} s/step "
            f"(dense), and {plan['steps']} steps of each fit the {summary['minutes']:g} minutes "
            "after setting aside the estimated evaluation time."
        )
    else:
        how = f"The step count ({plan['steps']}) was given with `--steps`."
    lines += [
        "",
        f"Batches of {s['batch_size']} x {s['seq_len']} bytes; AdamW, lr {s['lr']:g}, weight "
        f"decay {s['weight_decay']:g}, {s['warmup_steps']} warm-up steps then cosine decay to "
        f"{s['min_lr_ratio']:g} x lr, gradient clipping at {s['grad_clip']:g}; the MoE also "
        "optimises its weighted auxiliary losses ("
        + ", ".join(f"{k} {v:g}" for k, v in cfg["moe"]["loss_weights"].items())
        + f"). {how} {summary['threads']} torch threads.",
        "",
    ]
    if "loss" in plots:
        lines += [f"![Training loss and validation loss by domain]({plots['loss']})", ""]
    lines += [
        "## Where each domain's tokens go",
        "",
        "For each MoE layer, the routed slots (each token fills top-k slots) of the prose and "
        "of the code validation tokens are counted per expert and divided by the domain's "
        "total, so each domain's row sums to 1. The specialisation of a layer is the "
        "Jensen-Shannon divergence between the two rows, in bits: 0 when prose and code use "
        "the experts alike, 1 when they use disjoint experts. The same model at its "
        "initialisation (same seed, untrained) is the reference; the total variation "
        "(sum |p - q| / 2) is the share of slots that would have to move for the rows to match.",
        "",
    ]
    lines += _table(
        ["layer", "JSD (bits)", "JSD at init", "total variation", "most prose-leaning expert"],
        [
            [
                layer["layer"],
                f"{layer['jsd_bits']:.3f}",
                f"{layer['at_init']['jsd_bits']:.3f}",
                f"{layer['total_variation']:.3f}",
                _leaning(layer),
            ]
            for layer in summary["profile"]
        ],
    )
    lines.append("")
    if "heatmap" in plots:
        lines += [f"![Expert shares by domain, per layer]({plots['heatmap']})", ""]
    lines += ["Shares per layer (rows: domain; columns: expert):", ""]
    for layer in summary["profile"]:
        num_experts = len(layer["shares"][DOMAINS[0]])
        lines += [f"Layer {layer['layer']} (`{layer['name']}`):", ""]
        lines += _table(
            ["domain", *(str(e) for e in range(num_experts)), "routed slots"],
            [
                [
                    d,
                    *(f"{v:.3f}" for v in layer["shares"][d]),
                    f"{sum(layer['counts'][d]):,}",
                ]
                for d in DOMAINS
            ],
        )
        lines.append("")
    if "load" in plots:
        lines += [
            "## Expert load over training",
            "",
            "Each expert's share of the routed training slots per logging interval "
            "(`moe/routing.jsonl`, smoothed with a moving average); the dashed line is an "
            "even load.",
            "",
            f"![Expert load over training]({plots['load']})",
            "",
        ]
    timing = summary.get("timing", {})
    lines += [
        "## Reproduce",
        "",
        "```",
        summary["command"],
        "```",
        "",
        "`--steps` and `--eval-batches` fix what this run planned; without them the step "
        "count is fitted to `--minutes` on the machine at hand. "
        f"Wall time {timing.get('total_s', math.nan):.0f} s "
        f"(budget {timing.get('budget_s', math.nan):.0f} s); gatelab {summary['gatelab_version']}, "
        f"torch {summary['torch_version']}, Python {summary['python']}.",
        "",
        "Files: `moe/` and `dense/` (metrics.jsonl, routing.jsonl, checkpoints/), "
        "`summary.json` (every number above), the PNGs.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


STOPPED = {
    "completed": "planned steps",
    "time_budget": "time cap",
    "data_exhausted": "at the MoE's step",
}


def _bits(nats: float | None) -> str:
    return "" if nats is None else f"{nats / math.log(2):.4f}"


def _leaning(layer: dict[str, Any]) -> str:
    prose, code = layer["shares"]["prose"], layer["shares"]["code"]
    ratios = [(p / c if c > 0 else math.inf) for p, c in zip(prose, code, strict=True)]
    e = max(range(len(ratios)), key=lambda i: ratios[i])
    return f"{e} ({prose[e]:.2f} of prose vs {code[e]:.2f} of code)"
