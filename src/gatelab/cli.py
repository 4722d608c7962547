"""The ``gatelab`` command (also ``python -m gatelab``).

One sub-command per job, each built by an ``_add_<command>`` function that registers its
arguments and sets ``func`` to the function that runs it. Add a command (``train``,
``demo``, ...) by writing both and calling the ``_add_`` function in :func:`build_parser`.
"""

from __future__ import annotations

import argparse
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
    _add_bench(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["gatelab", *argv])
    return args.func(args) or 0


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


def _add_bench_moe(benchmarks) -> None:
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
        "--repeats", type=_int_at_least(1), default=None, help="timed calls per measurement"
    )
    moe.add_argument(
        "--warmup", type=_int_at_least(0), default=None, help="untimed calls before timing"
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


# -- argument types -------------------------------------------------------------------------


def _shape_arg(text: str):
    from .bench.moe import parse_shape

    try:
        return parse_shape(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _int_at_least(low: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be >= {low}, got {value}")
        return value

    parse.__name__ = f"int >= {low}"
    return parse


if __name__ == "__main__":
    raise SystemExit(main())
