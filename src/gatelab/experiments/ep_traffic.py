"""Expert-parallel traffic: the bytes counted by the dispatcher vs the formula.

Two Gloo processes on this machine train the moe-lm recipe with ``ep = 2`` through
``gatelab.parallelize`` and the Trainer (the path of ``torchrun ... train --ep 2``). Every
MoE layer's :class:`~gatelab.dispatch.ExpertParallel` counts the bytes it sends to the
other rank; a forward hook on each layer independently counts, from the Routing alone,
the slots each rank routes to the other rank's experts. After training the ranks gather
those counts, and the counters are checked against ``layer_bytes`` (docs/distributed.md):
forward = backward = (sent + received) * D * bytes per element, counts 8 E (W-1)/W per
forward. The table also gives the balanced-routing estimate 4 k T D s (W-1)/W and the share
of the step spent inside the token all-to-alls (blocking on Gloo).
"""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

NAME = "ep-traffic"
DESCRIPTION = (
    "expert-parallel all-to-all bytes per MoE layer and step: counters vs formula "
    "(2 Gloo processes, moe-lm, ep=2)"
)
WORLD = 2

SETTINGS = {
    "smoke": {
        "model.dim": 32,
        "model.num_layers": 2,
        "model.num_heads": 2,
        "model.max_seq_len": 16,
        "model.moe.num_experts": 4,
        "model.moe.hidden_dim": 32,
        "data.seq_len": 16,
        "data.batch_size": 4,
        "train.steps": 2,
    },
    "full": {
        "model.dim": 256,
        "model.num_layers": 4,
        "model.num_heads": 4,
        "model.max_seq_len": 128,
        "model.moe.num_experts": 8,
        "model.moe.hidden_dim": 512,
        "data.seq_len": 128,
        "data.batch_size": 16,
        "train.steps": 20,
    },
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _overrides(scale: str, seed: int, run_dir: Path) -> list[str]:
    values = {
        **SETTINGS[scale],
        "train.seed": seed,
        "train.warmup_steps": 1,
        "train.eval_every": 0,
        "train.save_every": 0,
        "train.routing_every": 0,
        "train.progress": "false",
        "train.verbose": "false",
    }
    return [f"{k}={v}" for k, v in values.items()] + [f'train.run_dir="{run_dir}"']


def _worker(rank: int, port: int, overrides: list[str], out: str) -> None:
    import torch
    import torch.distributed as dist

    from ..models.common import moe_modules
    from ..parallel import parallelize
    from ..recipes import load_recipe
    from ..recipes.run import build_run

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        recipe = load_recipe("moe-lm", overrides)
        torch.manual_seed(recipe["train"]["seed"])
        run = build_run(recipe)
        run.eval_fn = None  # count training steps only
        layers = moe_modules(run.model)
        per_dest = {name: torch.zeros(WORLD, dtype=torch.int64) for name in layers}

        def hook(name):
            def record(module, args, output):
                experts = module.last_routing.experts
                owner = experts[experts >= 0] // (module.num_experts // WORLD)
                per_dest[name] += torch.bincount(owner, minlength=WORLD)

            return record

        for name, layer in layers.items():
            layer.register_forward_hook(hook(name))
        run.model = parallelize(run.model, ep=WORLD)
        start = time.perf_counter()
        run.trainer().fit()
        seconds = time.perf_counter() - start
        result = {"rank": rank, "seconds": seconds, "layers": {}}
        for name, layer in layers.items():
            matrix = [torch.zeros(WORLD, dtype=torch.int64) for _ in range(WORLD)]
            dist.all_gather(matrix, per_dest[name])  # matrix[src][dst]: slots src -> dst
            result["layers"][name] = {
                "counters": dict(layer.dispatcher.counters),
                "sent": int(sum(matrix[rank][d] for d in range(WORLD) if d != rank)),
                "received": int(sum(matrix[s][rank] for s in range(WORLD) if s != rank)),
            }
        Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def run(scale: str, seed: int, out_dir: Path) -> dict:
    import torch.multiprocessing as mp

    from ..recipes import load_recipe

    out_dir = Path(out_dir)
    run_dir = out_dir / "run"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    overrides = _overrides(scale, seed, run_dir)
    mp.start_processes(
        _worker,
        args=(_free_port(), overrides, str(out_dir)),
        nprocs=WORLD,
        join=True,
        start_method="fork",  # the parent's imports carry over: seconds saved per process
    )
    model = load_recipe("moe-lm", overrides)["model"]
    data = load_recipe("moe-lm", overrides)["data"]
    steps = SETTINGS[scale]["train.steps"]
    dim, k, experts = model["dim"], model["moe"]["top_k"], model["moe"]["num_experts"]
    tokens = data["batch_size"] * data["seq_len"] // WORLD  # per rank and step
    balanced = 4 * k * tokens * dim * 4 * (WORLD - 1) / WORLD
    rows, checks = _rows(out_dir, dim, experts, steps, balanced)
    header = (
        f"moe-lm {scale}: D={dim}, E={experts}, k={k}, T={tokens} tokens per rank and step, "
        f"W={WORLD}, fp32 (s=4), {steps} steps; bytes per step sent to the other rank\n\n"
        "| rank | layer | forward (counter) | forward (formula) | backward (counter) | "
        "counts | balanced estimate 4kTDs(W-1)/W | (fwd+bwd) / estimate | counter = formula |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    return {
        "table": "\n".join([header, *rows]),
        "all_equal": all(checks),
        "settings": SETTINGS[scale],
    }


def _rows(out_dir: Path, dim: int, experts: int, steps: int, balanced: float):
    """Table rows per rank and layer (counters vs formula), and whether each layer agrees."""
    from ..dispatch import layer_bytes

    rows, checks = [], []
    for rank in range(WORLD):
        result = json.loads((out_dir / f"rank{rank}.json").read_text())
        exchange_s = 0.0
        for name, layer in result["layers"].items():
            c = layer["counters"]
            formula = layer_bytes(layer["sent"], layer["received"], dim, 4)
            counts = c["calls"] * 8 * (experts - experts // WORLD)
            ok = all(c[key] == formula[key] for key in formula) and c["count_bytes"] == counts
            checks.append(ok)
            exchange_s += c["exchange_s"]
            rows.append(
                f"| {rank} | {name} | {c['forward_bytes'] / steps:,.0f} | "
                f"{formula['forward_bytes'] / steps:,.0f} | {c['backward_bytes'] / steps:,.0f} | "
                f"{c['count_bytes'] / steps:,.0f} | {balanced:,.0f} | "
                f"{(c['forward_bytes'] + c['backward_bytes']) / steps / balanced:.3f} | "
                f"{'yes' if ok else 'NO'} |"
            )
        rows.append(
            f"| {rank} | all layers: {exchange_s:.3f} s in token all-to-alls of "
            f"{result['seconds']:.2f} s training ({exchange_s / result['seconds']:.1%}) "
            "| | | | | | | |"
        )
    return rows, checks
