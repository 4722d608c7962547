"""``gatelab steer``: MoTE's steering. Switch experts off, force them on or clamp neurons, and
measure next-token loss on each prompt set before and after; the model on disk is unchanged."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..io import atomic_dir, write_json
from ._common import (
    add_model_arguments,
    open_model,
    parse_experts,
    prompt_sets,
)
from ._outputs import check_output

HELP = "switch experts off / force them on / clamp neurons; loss per prompt set"
DESCRIPTION = (
    "MoTE's steering: apply the edits, measure next-token loss on each "
    "--set before and after, write steer.json. The model on disk is not changed."
)


WRITES = ("steer.json",)
"""What ``steer`` writes in ``--out`` (what ``--force`` may replace)."""

NEURONS_FORMAT = (
    'neurons.json of `gatelab localize` ({"neurons": [{"layer": L, "expert": E, "neuron": N}, '
    "...]}) or a JSON list of [layer, expert, neuron] triples"
)


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("steer", help=HELP, description=DESCRIPTION)
    add_model_arguments(p)
    p.add_argument("--off", default=None, help="experts to switch off, LAYER:E,E;LAYER:E")
    p.add_argument("--on", default=None, help="experts to force on, LAYER:E,E;LAYER:E")
    p.add_argument("--clamp", default=None, help="neurons.json from `gatelab localize`")
    p.add_argument(
        "--renormalize",
        action="store_true",
        help="rescale each token's remaining weights to their previous sum",
    )


def run(args: argparse.Namespace) -> int:
    from ..inspect.prompts import next_token_loss

    out = check_output(args, writes=WRITES)
    off = parse_experts(args.off) if args.off else None
    on = parse_experts(args.on) if args.on else None
    neurons = read_neurons(args.clamp) if args.clamp else []
    opened = open_model(args.model)
    sets = prompt_sets(args, opened)
    if not sets:
        raise ValueError("give at least one prompt set with --set NAME=FILE to measure")
    base = {n: next_token_loss(opened.model, p, n) for n, p in sets.items()}
    steered = _steered_losses(opened.model, sets, off, on, neurons, args.renormalize)
    result = {
        "off": off,
        "on": on,
        "clamped_neurons": len(neurons),
        "renormalize": args.renormalize,
        "loss": {
            n: {"base": base[n], "steered": steered[n], "change": steered[n] - base[n]}
            for n in sets
        },
    }
    with atomic_dir(out, overwrite=args.force) as tmp:
        write_json(tmp / "steer.json", result, indent=1)
    path = out / "steer.json"
    for n in sets:
        print(f"{n}: loss {base[n]:.4f} -> {steered[n]:.4f} nats/token")
    print(f"wrote {path}")
    return 0


def _steered_losses(model, sets, off, on, neurons, renormalize: bool) -> dict[str, float]:
    """Loss per set with the edits applied; the edits are removed again before returning."""
    from ..edit.steer import clamp_neurons, steer_experts
    from ..inspect.prompts import next_token_loss

    handles = []
    try:
        if off or on:
            handles.append(steer_experts(model, off=off, on=on, renormalize=renormalize))
        if neurons:
            handles.append(clamp_neurons(model, neurons))
        if not handles:
            raise ValueError("nothing to steer: give --off, --on and/or --clamp")
        return {n: next_token_loss(model, p, n) for n, p in sets.items()}
    finally:
        for handle in reversed(handles):
            handle.remove()


def read_neurons(file: str) -> list[tuple[int, int, int]]:
    """The (layer, expert, neuron) triples of a ``--clamp`` file (see :data:`NEURONS_FORMAT`);
    a ValueError naming the file, the bad entry and the format otherwise."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"--clamp {file} is not a file; expected {NEURONS_FORMAT}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(
            f"--clamp {file} is not JSON ({error}); expected {NEURONS_FORMAT}"
        ) from None
    if isinstance(data, dict):
        if "neurons" not in data:
            raise ValueError(f"--clamp {file} has no 'neurons' key; expected {NEURONS_FORMAT}")
        data = data["neurons"]
    if not isinstance(data, list):
        raise ValueError(f"--clamp {file}: the neurons must be a list; expected {NEURONS_FORMAT}")
    return [_neuron(entry, i, file) for i, entry in enumerate(data)]


def _neuron(entry, index: int, file: str) -> tuple[int, int, int]:
    keys = ("layer", "expert", "neuron")
    values = [entry.get(k) for k in keys] if isinstance(entry, dict) else entry
    ok = isinstance(values, list) and len(values) == 3
    if ok and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        return tuple(values)
    raise ValueError(
        f"--clamp {file}: neuron {index} is {json.dumps(entry)[:80]}, not three integers "
        f">= 0 (layer, expert, neuron); expected {NEURONS_FORMAT}"
    )
