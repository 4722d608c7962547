"""``gatelab demo``: an MoE LM against its dense equivalent on prose and code, on a laptop CPU.

A composition of the library's parts, with no training or profiling code of its own:

1. **Plan** (:func:`plan_for`): ``--minutes`` picks the step count and the validation batches
   from a table calibrated on a reference 2-core machine (:data:`REFERENCE_STEP_S`), never
   from timings taken at run time: the same command trains the same steps and prints the
   same numbers on every machine; a busy machine takes longer.
2. **Build** both models through the recipes (``moe-lm`` and ``dense-lm``:
   :func:`gatelab.recipes.build_run`); the demo overrides only the steps (and the warm-up,
   the same fraction of them), the run directory, the validation batches, the seed and run
   options that do not change the trajectory (``TrainConfig.RUN_ONLY``).
3. **Profile** the untrained MoE (the reference: routing depends on the bytes even at
   initialisation), **train** both with the recipes' Trainer, **evaluate** bits per byte per
   domain on the same validation batches, **profile** the trained MoE's routing per domain
   (:func:`gatelab.inspect.profile.profile_labels`).
4. **Plots** (:mod:`gatelab.inspect.plots`) and the **report** (one template, in
   :mod:`.demo_report`), ``summary.json`` (every number) and a short table on the terminal.

The run directory: created if missing; an error before any training when it cannot be
written. One that already holds a demo's outputs is an error unless ``--force``, which
removes only those outputs (``moe/``, ``dense/``, the report, the summary and the plots).
"""

from __future__ import annotations

import argparse
import itertools
import math
import platform
import shlex
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .. import __version__
from ..data.text import DOMAINS, load_corpus
from ..inspect import plots
from ..inspect.profile import LabelProfile, profile_labels
from ..io import ensure_writable_dir, write_json
from ..recipes import Run, build_run, load_recipe
from ..train import TrainResult, read_jsonl
from ..train.evaluate import bits_per_byte
from ._common import add_force_argument, int_at_least, positive
from .demo_report import LABELS, format_summary, write_report

__all__ = ["add_parser", "plan_for", "run", "Plan"]

RECIPES = {"moe": "moe-lm", "dense": "dense-lm"}
PLOTS = {
    "loss": "loss_curves.png",
    "heatmap": "expert_domain_heatmap.png",
    "load": "expert_load.png",
}
OUTPUTS = (*RECIPES, "report.md", "summary.json", *PLOTS.values())
PLOTS_HINT = "pip install 'gatelab[plots]'"

# -- the step table ---------------------------------------------------------------------------
# Seconds per training step (forward, backward, clipping, AdamW, inside the Trainer) of the
# moe-lm and dense-lm recipes at their batch 16 x seq 256, fp32, on the reference machine:
# an idle 2-core x86 CPU, measured for gatelab issue 14. Never re-measured at run time.
REFERENCE_STEP_S = {"moe": 0.44, "dense": 0.38}
FORWARD_FRACTION = 1 / 3  # an inference forward costs about a third of a training step
EVAL_SHARE = 0.10  # evaluation and profiling: at most a tenth of the run
RESERVE_SHARE = 0.05  # building the models, logging, checkpoints, plots, the report
# Per validation batch of one domain: the MoE runs 3 forwards (the untrained profile, the
# evaluation, the trained profile), the dense model 1 (its evaluation).
EVAL_FORWARDS = {"moe": 3, "dense": 1}
# The small model of --tiny (tests): only keys outside the MoE settings, so the experts,
# top-k and the dense FFN width stay the recipes'.
TINY = ["model.dim=32", "model.num_layers=2", "model.num_heads=2", "model.max_seq_len=32"]
TINY += ["data.seq_len=32", "data.batch_size=4"]


@dataclass(frozen=True)
class Plan:
    """What the demo trains and evaluates; ``reference_s`` is the time it takes on the
    reference machine (an estimate, not a limit)."""

    steps: int
    eval_batches: int
    reference_s: float
    from_table: bool


HELP = "the main job: train an MoE and a dense LM on prose + code, compare, profile"
DESCRIPTION = (
    "Train the moe-lm and dense-lm recipes (equal active parameters) on the "
    "two-domain byte corpus (same tokens, same seed), report bits per byte per domain, "
    "profile which experts each domain uses, and write report.md with plots."
)


def plan_for(minutes: float, steps: int | None = None, eval_batches: int | None = None) -> Plan:
    """The demo's work for ``minutes`` on the reference machine: a pure function.

    steps = floor(0.85 * budget / (0.44 + 0.38)); validation batches per domain =
    floor(0.10 * budget / (2 domains * (3 * 0.44 + 0.38) / 3)), at least 1. So 1 minute:
    62 steps, 5 batches; 5 minutes: 310 steps, 26 batches; 10 minutes: 621 steps, 52
    batches (fewer where a domain's validation split is shorter). ``steps`` and
    ``eval_batches`` replace the table's values.
    """
    budget_s = minutes * 60.0
    pair_s = sum(REFERENCE_STEP_S.values())
    forwards_s = sum(n * REFERENCE_STEP_S[name] for name, n in EVAL_FORWARDS.items())
    batch_s = len(DOMAINS) * FORWARD_FRACTION * forwards_s
    table_steps = max(1, math.floor((1 - EVAL_SHARE - RESERVE_SHARE) * budget_s / pair_s))
    table_batches = max(1, math.floor(EVAL_SHARE * budget_s / batch_s))
    steps, eval_batches = steps or table_steps, eval_batches or table_batches
    reference_s = (steps * pair_s + eval_batches * batch_s) / (1 - RESERVE_SHARE)
    from_table = (steps, eval_batches) == (table_steps, table_batches)
    return Plan(steps, eval_batches, reference_s, from_table)


# -- command line -----------------------------------------------------------------------------


OPTION_HELP = {
    "--minutes": "the demo's length on a reference 2-core machine: picks the training steps "
    "and validation batches from a fixed table (a slower machine takes longer, never trains "
    "less) (default: 10)",
    "--run-dir": "where the runs, plots, report.md and summary.json go (default: runs/demo)",
    "--seed": "seed of the initialisation and of training ([train] seed; the data is the "
    "recipes') (default: 0)",
    "--force": "overwrite the demo outputs already in --run-dir (only those are removed)",
    "--steps": "train both models for this many steps instead of the table's",
    "--eval-batches": "validation batches per domain instead of the table's",
    "--tiny": "a tiny model and short sequences: checks the pipeline in seconds (for tests)",
    "--no-plots": "skip the PNG plots (no matplotlib needed)",
}


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``gatelab demo`` and its options (:data:`HELP`) on ``subparsers``."""
    parser = subparsers.add_parser("demo", help=HELP, description=DESCRIPTION)
    add = parser.add_argument
    add("--minutes", type=positive(float), default=10.0, help=OPTION_HELP["--minutes"])
    add("--run-dir", default="runs/demo", help=OPTION_HELP["--run-dir"])
    add("--seed", type=int_at_least(0), default=0, help=OPTION_HELP["--seed"])
    add("--steps", type=positive(int), default=None, help=OPTION_HELP["--steps"])
    add("--eval-batches", type=positive(int), default=None, help=OPTION_HELP["--eval-batches"])
    add_force_argument(parser, help=OPTION_HELP["--force"])
    for flag in ("--tiny", "--no-plots"):
        add(flag, action="store_true", help=OPTION_HELP[flag])
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Run ``gatelab demo``; 0 on success, 130 on Ctrl-C. A user error raises ValueError."""
    try:
        summary = _run(args)
    except KeyboardInterrupt:
        print("gatelab demo: interrupted", file=sys.stderr, flush=True)
        return 130
    print(format_summary(summary))
    return 0


def _say(message: str) -> None:
    print(f"demo: {message}", flush=True)


def _run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    if not args.no_plots:
        _require_matplotlib()
    run_dir = prepare_run_dir(Path(args.run_dir), force=args.force)
    plan = plan_for(args.minutes, args.steps, args.eval_batches)
    runs = {name: build(name, args, plan, run_dir) for name in RECIPES}
    eval_sets = runs["moe"].eval_sets
    _say(
        f"training each model for {plan.steps} steps, then {plan.eval_batches} validation "
        f"batches per domain (about {plan.reference_s / 60:.1f} min on the reference 2-core "
        "machine; longer on a slower or busier one)"
    )
    init = profile(runs["moe"].model, eval_sets, "profiling the untrained MoE")
    results = {name: train(name, r, run_dir) for name, r in runs.items()}
    val = {name: evaluate(name, r.model, eval_sets) for name, r in runs.items()}
    trained = profile(runs["moe"].model, eval_sets, "profiling the trained MoE")
    summary = build_summary(args, plan, runs, results, val, trained, init)
    summary["run_dir"] = str(run_dir)
    if not args.no_plots:
        summary["plots"] = make_plots(run_dir, summary, trained)
    summary["timing"] = {"total_s": time.perf_counter() - start, "reference_s": plan.reference_s}
    write_report(run_dir, summary)
    write_json(run_dir / "summary.json", summary)
    return summary


# -- run directory ----------------------------------------------------------------------------


def prepare_run_dir(run_dir: Path, force: bool = False) -> Path:
    """Create ``run_dir`` and check it is writable; clear earlier demo outputs only with
    ``force``. Raises ValueError before anything is trained."""
    ensure_writable_dir(run_dir, "--run-dir", "pass another --run-dir or fix its permissions")
    existing = [name for name in OUTPUTS if (run_dir / name).exists()]
    if existing and not force:
        raise ValueError(
            f"--run-dir {run_dir} already holds a demo run ({', '.join(existing)}); pass "
            "--force to overwrite it, or another --run-dir"
        )
    for name in existing:
        path = run_dir / name
        try:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as error:
            raise ValueError(
                f"--force cannot remove the old {path} ({error.strerror or error})"
            ) from None
    return run_dir


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ValueError(f"the plots need matplotlib: {PLOTS_HINT} (or pass --no-plots)") from None


# -- the composition --------------------------------------------------------------------------


def overrides(name: str, args: argparse.Namespace, plan: Plan, run_dir: Path) -> list[str]:
    """The ``section.key=value`` settings the demo puts over the recipe ``RECIPES[name]``."""
    recipe = load_recipe(RECIPES[name])
    train = recipe["train"]
    # The recipe's warm-up, as the same fraction of the (shorter) run.
    warmup = round(plan.steps * train.get("warmup_steps", 0) / max(train.get("steps", 1), 1))
    out = [
        f"train.steps={plan.steps}",
        f"train.warmup_steps={warmup}",
        f"train.seed={args.seed}",
        f"train.run_dir={shlex.quote(str(run_dir / name))}",
        f"data.eval_batches={plan.eval_batches}",
        # Run options only (TrainConfig.RUN_ONLY): one checkpoint at the end, no messages.
        "train.save_every=0",
        "train.keep_checkpoints=1",
        "train.verbose=false",
    ]
    return out + (TINY if args.tiny else [])


def build(name: str, args: argparse.Namespace, plan: Plan, run_dir: Path) -> Run:
    """The recipe's run with the demo's overrides; the model initialised from ``--seed``."""
    torch.manual_seed(args.seed)
    return build_run(RECIPES[name], overrides(name, args, plan, run_dir))


def train(name: str, recipe_run: Run, run_dir: Path) -> TrainResult:
    """Train with the recipe's Trainer (its progress bar shows the ETA); the demo evaluates
    afterwards itself, on the same batches the recipe's eval_fn would use."""
    _say(f"training the {LABELS[name]} LM in {run_dir / name}")
    result = recipe_run.trainer(evaluate=False).fit()
    if result.stopped == "interrupted":
        raise KeyboardInterrupt
    rate = _tokens(run_dir / name) / max(result.elapsed_s, 1e-9)
    loss = "" if result.loss is None else f", last loss {result.loss:.4f} nats/byte"
    _say(f"  {result.step} steps in {result.elapsed_s:.1f} s ({rate:,.0f} tokens/s){loss}")
    recipe_run.model.eval()
    return result


def _batches(eval_sets: dict[str, list], desc: str):
    batches = list(itertools.chain.from_iterable(eval_sets.values()))
    return tqdm(batches, desc=desc, unit="batch", disable=None, leave=False)


def evaluate(name: str, model, eval_sets: dict[str, list]) -> dict[str, dict[str, float]]:
    """Bits per byte and targets per domain (:func:`gatelab.train.evaluate.bits_per_byte`)."""
    return bits_per_byte(model, _batches(eval_sets, f"evaluating the {LABELS[name]} LM"))


def profile(model, eval_sets: dict[str, list], desc: str) -> LabelProfile:
    """Routed slots per (layer, domain, expert) over the validation batches; a token's domain
    is its target's (-1 for padding, not counted)."""
    pairs = ((b.inputs, b.domains) for b in _batches(eval_sets, desc))
    return profile_labels(model, pairs, list(DOMAINS))


def _tokens(run_dir: Path) -> int:
    """Tokens trained on, from the last train record of ``run_dir/metrics.jsonl``."""
    records = read_jsonl(run_dir / "metrics.jsonl", kind="train")
    return int(records[-1]["tokens"]) if records else 0


# -- summary ----------------------------------------------------------------------------------


def model_shape(config: dict[str, Any]) -> dict[str, Any]:
    """The config values the report quotes; the MoE ones from the nested ``moe`` table
    (absent for the dense LM)."""
    moe = config.get("moe") or {}
    shape = {k: config.get(k) for k in ("num_layers", "dim", "moe_layers", "ffn_hidden_dim")}
    shape.update({k: moe.get(k) for k in ("num_experts", "top_k", "loss_weights")})
    shape["expert_hidden_dim"] = moe.get("hidden_dim")
    return shape


def _model_numbers(recipe_run: Run, result: TrainResult, run_dir: Path) -> dict[str, Any]:
    model, tokens = recipe_run.model, _tokens(run_dir)
    config = model.config.to_dict()
    return {
        "recipe": recipe_run.recipe.get("name"),
        "config": config,
        "shape": model_shape(config),
        "parameters": model.num_parameters(),
        "active_parameters": model.num_active_parameters(),
        "steps": result.step,
        "stopped": result.stopped,
        "tokens": tokens,
        "train_s": result.elapsed_s,
        "tokens_per_s": tokens / result.elapsed_s if result.elapsed_s > 0 else None,
        "final_train_loss": result.loss,
        "checkpoint": str(result.checkpoint) if result.checkpoint else None,
    }


def profile_rows(trained: LabelProfile, init: LabelProfile) -> list[dict[str, Any]]:
    """Per MoE layer: counts, shares, JSD and total variation (prose vs code), the most
    prose-leaning expert, and the same scores of the untrained model (``at_init``)."""
    rows = trained.compare(*DOMAINS, reference=init)
    for i, row in enumerate(rows):
        row["layer"] = i  # the position among the MoE layers (blocks keep their names)
        row["at_init"] = row.pop("reference")
    return rows


def build_summary(args, plan: Plan, runs, results, val, trained, init) -> dict[str, Any]:
    """Every number of the demo, JSON-able."""
    run_dir = Path(args.run_dir)
    moe = runs["moe"]
    data, cfg = moe.recipe["data"], moe.train_config
    corpus = load_corpus(seed=data.get("seed", 0), val_fraction=data.get("val_fraction", 0.1))
    out: dict[str, Any] = {
        "gatelab_version": __version__,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "seed": args.seed,
        "minutes": args.minutes,
        "tiny": bool(args.tiny),
        "plan": asdict(plan),
        "overrides": {name: overrides(name, args, plan, run_dir) for name in RECIPES},
        "settings": {
            "seq_len": data["seq_len"],
            "batch_size": data["batch_size"],
            **{k: getattr(cfg, k) for k in ("lr", "weight_decay", "warmup_steps")},
            **{k: getattr(cfg, k) for k in ("min_lr_ratio", "grad_clip")},
        },
        "corpus": corpus.stats(),
        "eval_batches": {d: len(b) for d, b in moe.eval_sets.items()},
        "models": {},
        "profile": profile_rows(trained, init),
        "command": reproduce_command(args, plan),
    }
    for name in RECIPES:
        numbers = _model_numbers(runs[name], results[name], run_dir / name)
        out["models"][name] = {**numbers, "val": val[name]}
    out["same_tokens"] = out["models"]["moe"]["tokens"] == out["models"]["dense"]["tokens"]
    return out


def reproduce_command(args: argparse.Namespace, plan: Plan) -> str:
    """The command that repeats this run's numbers."""
    parts = ["gatelab", "demo", "--minutes", f"{args.minutes:g}", "--seed", str(args.seed)]
    if not plan.from_table:
        parts += ["--steps", str(plan.steps), "--eval-batches", str(plan.eval_batches)]
    parts += ["--run-dir", str(args.run_dir)]
    parts += [flag for flag, on in (("--tiny", args.tiny), ("--no-plots", args.no_plots)) if on]
    return shlex.join([*parts, "--force"])


# -- plots ------------------------------------------------------------------------------------


def make_plots(run_dir: Path, summary: dict[str, Any], trained: LabelProfile) -> dict[str, str]:
    """Write the three PNGs; returns {kind: file name}."""
    records = {LABELS[n]: read_jsonl(run_dir / n / "metrics.jsonl", kind="train") for n in RECIPES}
    val = {
        LABELS[n]: {d: m["val"][d]["bits_per_byte"] for d in DOMAINS}
        for n, m in summary["models"].items()
    }
    plots.plot_loss_curves(records, val, run_dir / PLOTS["loss"])
    notes = [
        f"JSD {row['jsd_bits']:.3f} bits (at init {row['at_init']['jsd_bits']:.3f})"
        for row in summary["profile"]
    ]
    plots.plot_label_shares(trained, run_dir / PLOTS["heatmap"], notes)
    plots.plot_expert_load(read_jsonl(run_dir / "moe" / "routing.jsonl"), run_dir / PLOTS["load"])
    return dict(PLOTS)
