"""``gatelab demo``: a thin wrapper around :mod:`gatelab.demo` (parser and runner there)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ..demo import add_demo_arguments

    demo = subparsers.add_parser(
        "demo",
        help="the main job: train an MoE and a dense LM on prose + code, compare, profile",
        description="Train the MoE LM and the dense LM of equal active parameters on the "
        "two-domain byte corpus (same tokens, same seed), report bits per byte per domain, "
        "profile which experts each domain uses, and write runs/demo/report.md with plots.",
    )
    add_demo_arguments(demo)


def run(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    return run_demo(args)
