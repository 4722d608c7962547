"""``gatelab bench moe``, ``gatelab bench train`` and ``gatelab bench generate``: the
benchmarks' command line. The measuring code lives in :mod:`gatelab.bench`; this module
parses, prints and writes."""

from __future__ import annotations

import argparse

from ._common import add_force_argument, int_at_least, shape_arg
from ._outputs import check_output_file

BENCH_HELP = "benchmarks: ratios to dense and HF measured in one process, written as JSON"
BENCH_DESCRIPTION = (
    "Benchmarks that print a table of ratios measured in one process and write the numbers as JSON."
)

MOE_HELP = "the MoE layer vs an equal-FLOP dense MLP and HF Mixtral (eager, grouped_mm)"
MOE_DESCRIPTION = (
    "Time gatelab's MoE (grouped and loop dispatch), an equal-FLOP dense "
    "SwiGLU MLP and HF's Mixtral block with the same weights, forward and "
    "forward+backward; print ratios dense/variant and, for decode shapes, the fraction "
    "of the weight-bandwidth roofline reached."
)

TRAIN_HELP = "training tokens/s: the MoE LM vs the dense LM of equal active parameters"
TRAIN_DESCRIPTION = (
    "Time full training steps of the MoE LM and its dense equivalent "
    "round-robin in one process; print tokens/s and their ratio, write JSON."
)

GENERATE_HELP = "greedy generate() tokens/s of HF MoE models: eager, grouped_mm and gatelab experts"
GENERATE_DESCRIPTION = (
    "Build small transformers MoE models (Mixtral, Qwen3-MoE, DeepSeek-V3) from config with "
    "random weights and time greedy model.generate() with the experts implementations "
    "eager, grouped_mm and gatelab, round-robin on the same model; print tokens/s and "
    "gatelab's ratios, check the three generate the same tokens, write JSON."
)

CONTENDED_HELP = (
    "time while N busy processes (default 1: a pure-Python spin loop each, at this "
    "process's niceness) load the machine; started before timing, stopped after. Run once "
    "without and once with it to see what a busy neighbour costs"
)


def add_parser(subparsers) -> None:
    bench = subparsers.add_parser("bench", help=BENCH_HELP, description=BENCH_DESCRIPTION)
    benchmarks = bench.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    _add_moe_parser(benchmarks)
    _add_train_parser(benchmarks)
    _add_generate_parser(benchmarks)


def run(args: argparse.Namespace) -> int:
    return {"moe": run_moe, "train": run_train, "generate": run_generate}[args.benchmark](args)


# -- gatelab bench moe ------------------------------------------------------------------------


def _add_moe_parser(benchmarks) -> None:
    from ..bench.moe import CONTENDED_TARGET, DTYPES, SHAPE_FORMAT, SHAPE_SETS
    from ..bench.shapes import QUICK_SWEEP_DIVISOR, QUICK_SWEEP_MIN_TOKENS

    moe = benchmarks.add_parser("moe", help=MOE_HELP, description=MOE_DESCRIPTION)
    moe.add_argument(
        "--quick",
        action="store_true",
        help="smaller T and fewer repeats (well under a minute for the default set); "
        f"with --set sweep the training shapes run T/{QUICK_SWEEP_DIVISOR} tokens "
        f"(at least {QUICK_SWEEP_MIN_TOKENS})",
    )
    _add_device_argument(moe)
    moe.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default=None,
        help="parameter and input dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    _add_timing_arguments(moe, "timed calls per measurement", "untimed calls before timing")
    moe.add_argument(
        "--shapes",
        nargs="+",
        type=shape_arg,
        default=None,
        metavar="SHAPE",
        help=f"shapes to run instead of a --set, each {SHAPE_FORMAT}",
    )
    moe.add_argument(
        "--set",
        dest="shape_set",
        choices=SHAPE_SETS,
        default=None,
        help="named shapes: default (the per-device defaults) or sweep (issue 17: 7 training "
        "shapes, fwd+bwd, and 4 decode shapes, fwd; CPU fp32); not with --shapes",
    )
    _add_contended_argument(moe)
    moe.add_argument(
        "--baseline",
        default=None,
        metavar="PATH",
        help="with --contended: the JSON of an earlier idle `gatelab bench moe` run of the "
        "same shapes; the summary then gives per shape gatelab grouped's MoE/dense time "
        f"ratio contended / idle (issue 17's target: <= {CONTENDED_TARGET})",
    )
    _add_json_argument(moe, "moe")
    moe.add_argument(
        "--no-hf", action="store_true", help="skip the Hugging Face transformers variants"
    )
    moe.add_argument(
        "--compile",
        action="store_true",
        help="also time dense, gatelab grouped and HF grouped_mm through torch.compile "
        "(inductor, fullgraph; compiled once per shape outside the clock)",
    )
    moe.set_defaults(parser=moe)


def run_moe(args: argparse.Namespace) -> int:
    """Run ``gatelab bench moe``: print the table, write the JSON. Settings that cannot run
    (both --set and --shapes, a --baseline that does not fit) are usage errors, found
    before anything is timed."""
    from ..bench.moe import (
        BenchSettings,
        check_baseline,
        format_table,
        load_baseline,
        resolve_shapes,
        run_moe_bench,
    )

    settings = BenchSettings(
        device=args.device,
        dtype=args.dtype,
        warmup=args.warmup,
        repeats=args.repeats,
        quick=args.quick,
        hf=not args.no_hf,
        compile=args.compile,
        shape_set=getattr(args, "shape_set", None),
        contended=getattr(args, "contended", 0),
    )
    baseline = None
    try:
        settings = settings.resolved()
        shapes = resolve_shapes(args.shapes, settings)
        if getattr(args, "baseline", None) is not None:
            baseline = load_baseline(args.baseline)
            check_baseline(baseline, shapes, settings)
    except ValueError as error:
        _usage_error(args, error)
    path = _json_path(args, f"moe-{settings.device}")
    result = run_moe_bench(
        args.shapes, settings, command=getattr(args, "command_line", None), baseline=baseline
    )
    return _print_and_write(format_table(result), result, path)


# -- gatelab bench train ----------------------------------------------------------------------


def _add_train_parser(benchmarks) -> None:
    train = benchmarks.add_parser("train", help=TRAIN_HELP, description=TRAIN_DESCRIPTION)
    add_train_arguments(train)


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``gatelab bench train``'s options on ``parser``."""
    from ..bench.train import DATA_SOURCES
    from ..dispatch import DISPATCHERS
    from ..routing import ROUTERS

    parser.add_argument(
        "--quick",
        action="store_true",
        help="batch 4 x seq 128 and fewer steps on CPU (under 30 s)",
    )
    _add_device_argument(parser)
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=None,
        help="sequences per step (default: 8 on CPU, 4 with --quick; 32 on CUDA)",
    )
    parser.add_argument(
        "--seq-len",
        type=int_at_least(1),
        default=None,
        help="tokens per sequence (default: 256; 128 with --quick on CPU)",
    )
    _add_timing_arguments(parser, "timed steps per model", "untimed steps per model first")
    parser.add_argument(
        "--router",
        choices=ROUTERS.names(),
        default=None,
        help="the MoE LM's router (default: topk, the reference model's)",
    )
    parser.add_argument(
        "--dispatcher",
        choices=["auto", *DISPATCHERS.names()],
        default=None,
        help="the MoE LM's dispatcher (default: auto)",
    )
    parser.add_argument(
        "--data",
        choices=DATA_SOURCES,
        default="corpus",
        help="corpus: windows of the two-domain corpus (default); random: random token ids",
    )
    _add_contended_argument(parser)
    _add_json_argument(parser, "train")
    parser.set_defaults(parser=parser)


def run_train(args: argparse.Namespace) -> int:
    """Run ``gatelab bench train``: print the table, write the JSON. Settings that cannot
    run (a sequence longer than the corpus allows, say) are usage errors, found before
    anything is timed."""
    from ..bench.train import (
        TrainBenchSettings,
        check_corpus_fits,
        format_table,
        moe_config,
        run_train_bench,
    )

    settings = TrainBenchSettings(
        device=args.device,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        warmup=args.warmup,
        repeats=args.repeats,
        quick=args.quick,
        data=args.data,
        router=args.router,
        dispatcher=args.dispatcher,
        contended=getattr(args, "contended", 0),
    )
    try:
        settings = settings.resolved()
        config = moe_config(settings)
        if settings.data == "corpus":
            check_corpus_fits(settings)
    except ValueError as error:
        _usage_error(args, error)
    path = _json_path(args, f"train-{settings.device}")
    result = run_train_bench(settings, config, command=getattr(args, "command_line", None))
    return _print_and_write(format_table(result), result, path)


# -- gatelab bench generate -------------------------------------------------------------------


def _add_generate_parser(benchmarks) -> None:
    generate = benchmarks.add_parser(
        "generate", help=GENERATE_HELP, description=GENERATE_DESCRIPTION
    )
    add_generate_arguments(generate)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Register ``gatelab bench generate``'s options on ``parser``."""
    from ..bench.generate import DEFAULT_STEPS, MODELS

    new_tokens, warmup, repeats = DEFAULT_STEPS[False]
    quick_tokens, _, quick_repeats = DEFAULT_STEPS[True]
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{quick_tokens} new tokens and {quick_repeats} repeats (under about a minute on CPU)",
    )
    _add_device_argument(parser)
    parser.add_argument(
        "--models",
        nargs="+",
        choices=MODELS,
        default=None,
        metavar="MODEL",
        help=f"models to run (default: all of {', '.join(MODELS)})",
    )
    parser.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=None,
        help=f"tokens generated per sequence and call (default: {new_tokens}; "
        f"{quick_tokens} with --quick)",
    )
    parser.add_argument(
        "--prompt-len",
        type=int_at_least(1),
        default=16,
        help="random prompt tokens per sequence (default: 16)",
    )
    parser.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=1,
        help="sequences per generate call (default: 1)",
    )
    parser.add_argument(
        "--repeats",
        type=int_at_least(1),
        default=None,
        help=f"timed generate calls per implementation (default: {repeats}; "
        f"{quick_repeats} with --quick)",
    )
    parser.add_argument(
        "--warmup",
        type=int_at_least(1),
        default=None,
        help=f"untimed calls per implementation first, the first of which checks the "
        f"tokens (default: {warmup})",
    )
    _add_contended_argument(parser)
    _add_json_argument(parser, "generate")
    parser.set_defaults(parser=parser)


def run_generate(args: argparse.Namespace) -> int:
    """Run ``gatelab bench generate``: print the table, write the JSON."""
    from ..bench.generate import (
        GenerateBenchSettings,
        format_table,
        run_generate_bench,
        transformers_available,
    )

    settings = GenerateBenchSettings(
        device=args.device,
        models=tuple(args.models) if args.models else None,
        max_new_tokens=args.max_new_tokens,
        prompt_len=args.prompt_len,
        batch_size=args.batch_size,
        warmup=args.warmup,
        repeats=args.repeats,
        quick=args.quick,
        contended=getattr(args, "contended", 0),
    )
    try:
        settings = settings.resolved()
        if not transformers_available():
            raise ValueError("gatelab bench generate needs transformers; pip install 'gatelab[hf]'")
    except ValueError as error:
        _usage_error(args, error)
    path = _json_path(args, f"generate-{settings.device}")
    result = run_generate_bench(settings, command=getattr(args, "command_line", None))
    return _print_and_write(format_table(result), result, path)


# -- shared by all -----------------------------------------------------------------------------


def _usage_error(args: argparse.Namespace, error: ValueError) -> None:
    """Settings that cannot run: argparse's usage error (exit status 2) where the parser is
    known, else the error goes on to the user-error funnel."""
    parser = getattr(args, "parser", None)
    if parser is None:
        raise error
    parser.error(str(error))


def _add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda", "auto"),
        default="auto",
        help="where to run (default: auto = cuda when available)",
    )


def _add_contended_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--contended",
        nargs="?",
        type=int_at_least(1),
        const=1,
        default=0,
        metavar="N",
        help=CONTENDED_HELP,
    )


def _add_timing_arguments(
    parser: argparse.ArgumentParser, repeats_help: str, warmup_help: str
) -> None:
    parser.add_argument("--repeats", type=int_at_least(1), default=None, help=repeats_help)
    parser.add_argument("--warmup", type=int_at_least(0), default=None, help=warmup_help)


def _add_json_argument(parser: argparse.ArgumentParser, benchmark: str) -> None:
    parser.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help=f"where to write the results (default: bench-results/{benchmark}-<device>.json)",
    )
    add_force_argument(parser, help="replace an existing --json file")


def _json_path(args: argparse.Namespace, default_name: str):
    """``--json`` (default bench-results/NAME.json), checked before anything is timed."""
    return check_output_file(
        args.json or f"bench-results/{default_name}.json", args.force, "--json"
    )


def _print_and_write(table: str, result: dict, path) -> int:
    """Print the table, write the result to ``path``."""
    from ..io import write_json

    print(table)
    written = write_json(path, result)
    print(f"\nwrote {written}")
    return 0
