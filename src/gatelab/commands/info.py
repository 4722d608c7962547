"""``gatelab info CHECKPOINT``: what a checkpoint holds."""

from __future__ import annotations

import argparse
import json

from ._common import add_checkpoint_parser, checkpoint_meta, count_parameters

HELP = "what a checkpoint holds: config, parameters, active parameters, routing"
DESCRIPTION = (
    "Print a checkpoint's recipe, its parameter counts (total and active per "
    "token) and the last routing summary its run logged (routing.jsonl)."
)


def add_parser(subparsers) -> None:
    add_checkpoint_parser(subparsers, "info", help=HELP, description=DESCRIPTION)


def run(args: argparse.Namespace) -> int:
    from ..recipes.run import build_run
    from ..train.metrics import read_jsonl

    path, meta = checkpoint_meta(args.checkpoint)
    model = build_run(meta["config"]["run"]).model
    total = count_parameters(model)
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
