"""``gatelab info CHECKPOINT``: what a checkpoint holds."""

from __future__ import annotations

import argparse
import json

from ._common import add_checkpoint_parser, checkpoint_meta, checkpoint_model, count_parameters

HELP = "what a checkpoint holds: config, parameters, active parameters, routing"
DESCRIPTION = (
    "Print a checkpoint's recipe, its parameter counts (total and active per "
    "token) and the last routing summary its run logged (routing.jsonl)."
)


def add_parser(subparsers) -> None:
    add_checkpoint_parser(subparsers, "info", help=HELP, description=DESCRIPTION)


def run(args: argparse.Namespace) -> int:
    from ..train.metrics import read_jsonl

    path, meta = checkpoint_meta(args.checkpoint)  # checked against the tensors' header
    model = checkpoint_model(meta, device="meta")  # counts need shapes only: no memory
    if model is None:
        model = checkpoint_model(meta)
    total = count_parameters(model)
    active = model.num_active_parameters() if hasattr(model, "num_active_parameters") else total
    config = meta.get("config") or {}
    print(f"checkpoint  {path} (step {meta['step']}, torch {meta.get('torch_version')})")
    print(f"recipe      {json.dumps(config.get('run'), sort_keys=True)}")
    print(f"training    {json.dumps(config.get('train'), sort_keys=True)}")
    print(f"parameters  {total:,} total, {active:,} active per token")
    routing_log = path.parent.parent / "routing.jsonl"
    records = read_jsonl(routing_log) if routing_log.exists() else []
    layers = records[-1].get("layers") if records else None
    if not records:
        print("routing     (no routing.jsonl next to the checkpoint)")
    elif not isinstance(layers, dict):
        print(f"routing     ({routing_log}'s last record has no 'layers' table)")
    for name, stats in (layers if isinstance(layers, dict) else {}).items():
        try:
            print(
                f"routing     {name}: load share {[round(s, 3) for s in stats['load_share']]}, "
                f"dead experts {stats['dead_experts']}, load entropy "
                f"{stats['load_entropy']:.3f} (steps {records[-1].get('from_step')}.."
                f"{records[-1].get('step')})"
            )
        except (KeyError, TypeError, ValueError):
            print(f"routing     {name}: (malformed record in {routing_log})")
    return 0
