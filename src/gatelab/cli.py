"""The ``gatelab`` command (also ``python -m gatelab``).

One sub-command per job, each built by an ``_add_<command>`` function that registers its
arguments and sets ``func`` to the function that runs it. Add a command (``train``,
``demo``, ...) by writing both and calling the ``_add_`` function in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence

from . import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gatelab",
        description="gatelab: routers, expert banks and fast dispatch for gated PyTorch models.",
    )
    parser.add_argument("--version", action="version", version=f"gatelab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_demo(commands)
    _add_train(commands)
    _add_eval(commands)
    _add_info(commands)
    _add_bench(commands)
    _add_experiment(commands)
    _add_model_tools(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["gatelab", *argv])
    try:
        return args.func(args) or 0
    except _user_errors() as error:
        # Bad recipes, configs, checkpoints or run directories: the message says what to fix.
        print(f"gatelab {args.command}: error: {error}", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[Exception], ...]:
    from .models.config import ConfigError
    from .recipes import RecipeError
    from .train import TrainError
    from .train.checkpoint import CheckpointError

    return (RecipeError, ConfigError, TrainError, CheckpointError, FileNotFoundError)


# -- gatelab demo ---------------------------------------------------------------------------


def _add_demo(commands) -> None:
    from .commands import demo

    demo.add_parser(commands)


# -- gatelab train / eval / info -----------------------------------------------------------


def _add_train(commands) -> None:
    train = commands.add_parser(
        "train",
        help="train a recipe (a shipped name such as moe-lm, or a .toml path)",
        description="Train the run a recipe describes. Shipped recipes: moe-lm, dense-lm, "
        "digits-moe, digits-dense. Metrics, routing telemetry and checkpoints go to the "
        "run directory ([train] run_dir, runs/<recipe> by default).",
    )
    train.add_argument("recipe", help="a shipped recipe name or a path to a .toml file")
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override a recipe value (TOML syntax), e.g. --set train.steps=200; repeatable",
    )
    train.add_argument(
        "--resume", action="store_true", help="continue from the run directory's latest checkpoint"
    )
    from .bench.common import int_at_least

    train.add_argument(
        "--ep",
        type=int_at_least(1),
        default=None,
        metavar="N",
        help="expert-parallel size under torchrun (experts sharded over N ranks; the rest "
        "data parallel), e.g. torchrun --nproc_per_node=2 -m gatelab train moe-lm --ep 2",
    )
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .recipes.run import run_recipe

    result = run_recipe(args.recipe, args.overrides, resume=args.resume, ep=args.ep)
    if _is_main_process():
        print(
            json.dumps(
                {
                    "step": result.step,
                    "stopped": result.stopped,
                    "loss": result.loss,
                    "eval": result.eval,
                    "checkpoint": str(result.checkpoint),
                }
            )
        )
    return 0 if result.stopped in ("completed", "time_budget", "interrupted") else 1


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a plain process: the one that prints the result."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _add_eval(commands) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="evaluate a checkpoint (or a run directory's latest) as its recipe says",
        description="Rebuild the model and evaluation from the recipe stored in a checkpoint, "
        "load its weights and print the evaluation metrics as JSON.",
    )
    evaluate.add_argument("checkpoint", help="a checkpoint .json, a checkpoints/ dir or a run dir")
    evaluate.set_defaults(func=cmd_eval)


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .recipes.run import build_run
    from .train.checkpoint import load_checkpoint

    path, meta = _checkpoint_meta(args.checkpoint)
    run = build_run(meta["config"]["run"])
    load_checkpoint(path, run.model, rng=False)
    run.model.eval()
    with torch.no_grad():
        metrics = run.eval_fn(run.model)
    print(json.dumps({"checkpoint": str(path), "step": meta["step"], **metrics}))
    return 0


def _add_info(commands) -> None:
    info = commands.add_parser(
        "info",
        help="what a checkpoint holds: config, parameters, active parameters, routing",
        description="Print a checkpoint's recipe, its parameter counts (total and active per "
        "token) and the last routing summary its run logged (routing.jsonl).",
    )
    info.add_argument("checkpoint", help="a checkpoint .json, a checkpoints/ dir or a run dir")
    info.set_defaults(func=cmd_info)


def cmd_info(args: argparse.Namespace) -> int:
    from .recipes.run import build_run
    from .train.metrics import read_jsonl

    path, meta = _checkpoint_meta(args.checkpoint)
    run = build_run(meta["config"]["run"])
    model = run.model
    total = sum(p.numel() for p in model.parameters())
    active = model.num_active_parameters() if hasattr(model, "num_active_parameters") else total
    print(f"checkpoint  {path} (step {meta['step']}, torch {meta.get('torch_version')})")
    print(f"recipe      {json.dumps(meta['config']['run'], sort_keys=True)}")
    print(f"training    {json.dumps(meta['config']['train'], sort_keys=True)}")
    print(f"parameters  {total:,} total, {active:,} active per token")
    routing_log = path.parent.parent / "routing.jsonl"
    records = read_jsonl(routing_log) if routing_log.exists() else []
    if not records:
        print("routing     (no routing.jsonl next to the checkpoint)")
    for name, stats in (records[-1]["layers"] if records else {}).items():
        print(
            f"routing     {name}: load share {[round(s, 3) for s in stats['load_share']]}, "
            f"dead experts {stats['dead_experts']}, load entropy {stats['load_entropy']:.3f} "
            f"(steps {records[-1].get('from_step')}..{records[-1]['step']})"
        )
    return 0


def _checkpoint_meta(where: str):
    """(path, metadata) of a checkpoint given as its file, its directory or its run dir."""
    from pathlib import Path

    from .train.checkpoint import latest_checkpoint, read_checkpoint

    path = Path(where)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints" if (path / "checkpoints").is_dir() else path)
        if found is None:
            raise FileNotFoundError(
                f"no checkpoint in {where}; give a checkpoint .json or a run dir"
            )
        path = found
    meta, _ = read_checkpoint(path)
    if "run" not in (meta.get("config") or {}):
        raise FileNotFoundError(f"{path} was not written by `gatelab train` (it holds no recipe)")
    return Path(meta["_path"]), meta


# -- gatelab bench ------------------------------------------------------------------------


def _add_bench(commands) -> None:
    bench = commands.add_parser(
        "bench",
        help="benchmarks: ratios to dense and HF measured in one process, written as JSON",
        description="Benchmarks that print a table of ratios measured in one process and "
        "write the numbers as JSON.",
    )
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    _add_bench_moe(benchmarks)
    _add_bench_train(benchmarks)


def _add_bench_train(benchmarks) -> None:
    from .bench.train import add_arguments, run

    train = benchmarks.add_parser(
        "train",
        help="training tokens/s: the MoE LM vs the dense LM of equal active parameters",
        description="Time full training steps of the MoE LM and its dense equivalent "
        "round-robin in one process; print tokens/s and their ratio, write JSON.",
    )
    add_arguments(train)
    train.set_defaults(func=run)


def _add_bench_moe(benchmarks) -> None:
    from .bench.common import int_at_least
    from .bench.moe import DTYPES, SHAPE_FORMAT

    moe = benchmarks.add_parser(
        "moe",
        help="the MoE layer vs an equal-FLOP dense MLP and HF Mixtral (eager, grouped_mm)",
        description="Time gatelab's MoE (grouped and loop dispatch), an equal-FLOP dense "
        "SwiGLU MLP and HF's Mixtral block with the same weights, forward and "
        "forward+backward; print ratios dense/variant and, for decode shapes, the fraction "
        "of the weight-bandwidth roofline reached.",
    )
    moe.add_argument(
        "--quick", action="store_true", help="smaller T and fewer repeats (well under a minute)"
    )
    moe.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to run (default: auto = cuda when available)",
    )
    moe.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="parameter and input dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    moe.add_argument(
        "--repeats", type=int_at_least(1), default=None, help="timed calls per measurement"
    )
    moe.add_argument(
        "--warmup", type=int_at_least(0), default=None, help="untimed calls before timing"
    )
    moe.add_argument(
        "--shapes",
        nargs="+",
        type=_shape_arg,
        default=None,
        metavar="SHAPE",
        help=f"shapes to run instead of the defaults, each {SHAPE_FORMAT}",
    )
    moe.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="where to write the results (default: bench-results/moe-<device>.json)",
    )
    moe.add_argument(
        "--no-hf", action="store_true", help="skip the Hugging Face transformers variants"
    )
    moe.set_defaults(func=cmd_bench_moe, parser=moe)


def cmd_bench_moe(args: argparse.Namespace) -> int:
    """Run ``gatelab bench moe``: print the table, write the JSON."""
    from .bench.common import write_json_atomic
    from .bench.moe import BenchSettings, format_table, run_moe_bench

    settings = BenchSettings(
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        quick=args.quick,
        hf=not args.no_hf,
    )
    try:
        settings = settings.resolved()
    except ValueError as error:
        args.parser.error(str(error))
    result = run_moe_bench(args.shapes, settings, command=getattr(args, "command_line", None))
    print(format_table(result))
    path = write_json_atomic(result, args.json or f"bench-results/moe-{settings.device}.json")
    print(f"\nwrote {path}")
    return 0


# -- gatelab experiment ---------------------------------------------------------------------


def _add_experiment(commands) -> None:
    experiment = commands.add_parser(
        "experiment",
        help="run an experiment that tests a paper's claim (see `gatelab experiment list`)",
        description="Run one experiment of gatelab.experiments: print its table of measured "
        "numbers and write result.json (the numbers docs/results.md quotes come from here).",
    )
    experiment.add_argument("name", help="experiment name, or 'list' to list them")
    experiment.add_argument(
        "--scale",
        choices=("smoke", "full"),
        default="full",
        help="full: the documented run (default); smoke: seconds, to check it runs",
    )
    experiment.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    experiment.add_argument(
        "--out", default=None, help="output directory (default runs/experiments/NAME)"
    )
    experiment.set_defaults(func=cmd_experiment, parser=experiment)


def cmd_experiment(args: argparse.Namespace) -> int:
    from . import experiments
    from .bench.common import environment, utc_now, write_json_atomic

    if args.name == "list":
        for name in experiments.names():
            print(f"{name:24s} {experiments.get(name).description}")
        return 0
    try:
        experiment = experiments.get(args.name)
    except ValueError as error:
        args.parser.error(str(error))
    out = args.out or f"runs/experiments/{experiment.name}"
    started = utc_now()
    result = experiment.run(scale=args.scale, seed=args.seed, out_dir=out)
    result.update(
        command=getattr(args, "command_line", None), started=started, environment=environment("cpu")
    )
    print(result["table"])
    path = write_json_atomic(result, f"{out}/result.json")
    print(f"\nwrote {path} ({result['seconds']} s)")
    return 0


# -- gatelab profile / localize / steer / prune / skip / pregate / transcoder ----------------


def _add_model_tools(commands) -> None:
    """The model-inspection and editing commands; parsers and implementations in tools.py."""
    from .tools import add_parsers

    add_parsers(commands)


# -- argument types -------------------------------------------------------------------------


def _shape_arg(text: str):
    from .bench.moe import parse_shape

    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


if __name__ == "__main__":
    raise SystemExit(main())
