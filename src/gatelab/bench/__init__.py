"""Benchmarks that print ratios measured side by side in one process and write JSON.

``gatelab bench moe`` (:mod:`gatelab.bench.moe`) times the MoE layer against an
equal-FLOP dense MLP and Hugging Face's Mixtral block built with the same weights.
"""

from .common import copy_bandwidth, timeit, write_json_atomic
from .moe import BenchSettings, Shape, format_table, parse_shape, run_moe_bench

__all__ = [
    "BenchSettings",
    "Shape",
    "copy_bandwidth",
    "format_table",
    "parse_shape",
    "run_moe_bench",
    "timeit",
    "write_json_atomic",
]
