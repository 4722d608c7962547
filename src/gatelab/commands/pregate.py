"""``gatelab pregate``: distil pre-gates, then compare offloaded inference modes (all experts
resident, offloaded with on-demand loading, offloaded with pre-gate prefetch). The methods
live in ``edit.pregate`` and ``edit.offload``."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ..io import atomic_dir, write_json
from ._common import (
    add_model_arguments,
    all_prompts,
    int_at_least,
    open_model,
    prompt_sets,
    save_state,
)
from ._outputs import check_output

HELP = "train pre-gates; offloaded inference: resident vs on demand vs prefetch"
DESCRIPTION = (
    "Distil one pre-gate per MoE layer from the next layer's router on the "
    "calibration --set(s), report its hit rate, then run the prompts with all experts "
    "resident, offloaded with on-demand loading and offloaded with pre-gate prefetch "
    "(experts in safetensors under OUT/experts, an LRU cache of --capacity experts): "
    "tokens/s, peak resident expert bytes, misses, and whether outputs equal the "
    "resident model's. Writes pregate.json and pregates.safetensors."
)


WRITES = ("experts", "pregates.safetensors", "pregate.json")
"""What ``pregate`` writes in ``--out`` (what ``--force`` may replace)."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("pregate", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument(
        "--steps", type=int_at_least(1), default=200, help="distillation steps (default 200)"
    )
    p.add_argument(
        "--capacity",
        type=int_at_least(1),
        default=None,
        help="experts in the cache (default: half of all routed experts)",
    )


def run(args: argparse.Namespace) -> int:
    from ..edit.pregate import pregate_hit_rate, train_pregates
    from ..inspect.access import find_moe_blocks

    out = check_output(args, writes=WRITES)
    opened = open_model(args.model)
    sets = prompt_sets(args, opened)
    prompts = all_prompts(sets)
    if not prompts:
        raise ValueError("give at least one calibration set with --set NAME=FILE")
    model = opened.model
    total = sum(b.num_experts for b in find_moe_blocks(model))
    capacity = args.capacity if args.capacity is not None else max(1, total // 2)
    gates = train_pregates(model, prompts, steps=args.steps)
    hits = pregate_hit_rate(model, gates, prompts)
    with atomic_dir(out, overwrite=args.force) as tmp:
        rows = _compare_modes(model, gates, prompts, capacity, tmp / "experts")
        save_state(gates, tmp / "pregates.safetensors")
        write_json(
            tmp / "pregate.json",
            {"sets": list(sets), "capacity": capacity, "hit_rate": hits, "modes": rows},
            indent=1,
        )
    path = out / "pregate.json"
    for layer, h in hits.items():
        print(
            f"pre-gate {layer} -> {gates.next_layer[layer]}: hit rate {h['hit_rate']:.3f} "
            f"(chance {h['chance']:.3f})"
        )
    for row in rows:
        print(
            f"{row['mode']}: {row['tokens_per_s']:.0f} tokens/s, peak resident experts "
            f"{row['peak_resident_bytes'] / 2**20:.2f} MB, equals resident: {row['exact']}"
        )
    print(f"wrote {path} and {out / 'pregates.safetensors'}")
    return 0


def _compare_modes(model, gates, prompts, capacity: int, directory: Path) -> list[dict]:
    """tokens/s, resident bytes and exactness of the resident, on-demand and prefetch modes."""
    from ..dispatch.cpu_threads import forced_strategy
    from ..edit.offload import OffloadedExperts, resident_expert_bytes
    from ..inspect.access import prompt_batches

    batches = prompt_batches(model, prompts, "prompts")
    tokens = sum(b.numel() for b in batches)
    device = next(model.parameters()).device

    def timed():
        start = time.perf_counter()
        # One CPU strategy for all three modes: the load-dependent choice between
        # phase-wise and split can change the last bit (docs/benchmarks.md), and
        # "exact" compares the modes' logits bit for bit.
        with torch.no_grad(), forced_strategy("phases"):
            logits = [model(b.to(device)).logits for b in batches]
        return time.perf_counter() - start, logits

    seconds, reference = timed()
    rows = [
        {
            "mode": "all resident",
            "tokens_per_s": tokens / seconds,
            "exact": True,
            "peak_resident_bytes": resident_expert_bytes(model),
        }
    ]
    for mode, pregates in (("on demand", None), ("pre-gate prefetch", gates)):
        with OffloadedExperts(model, directory, capacity, pregates=pregates) as off:
            seconds, logits = timed()
            off.wait()
        exact = all(torch.equal(a, b) for a, b in zip(logits, reference, strict=True))
        rows.append(
            {"mode": mode, "tokens_per_s": tokens / seconds, "exact": exact, **off.stats.as_dict()}
        )
    return rows
