"""Benchmarks that print ratios measured side by side in one process and write JSON.

``gatelab bench moe`` (:mod:`gatelab.bench.moe`) times the MoE layer against an
equal-FLOP dense MLP and Hugging Face's Mixtral block built with the same weights;
``gatelab bench train`` (:mod:`gatelab.bench.train`) times training steps of the MoE LM
against its dense equivalent; ``gatelab bench generate`` (:mod:`gatelab.bench.generate`)
times greedy ``generate()`` of small HF MoE models with transformers' experts
implementations and gatelab's. Each can run beside busy processes (``--contended``,
:func:`gatelab.bench.common.busy_processes`). The command line lives in
:mod:`gatelab.commands.bench`.
"""

from .common import copy_bandwidth, timeit
from .moe import BenchSettings, Shape, format_table, parse_shape, run_moe_bench

__all__ = [
    "BenchSettings",
    "Shape",
    "copy_bandwidth",
    "format_table",
    "parse_shape",
    "run_moe_bench",
    "timeit",
]


def __getattr__(name: str):
    """``write_json_atomic``: deprecated, see :func:`gatelab.io.write_json`."""
    if name == "write_json_atomic":
        from . import common

        return common.write_json_atomic  # warns
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
