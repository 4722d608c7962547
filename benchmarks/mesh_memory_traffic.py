"""Per-rank memory and FSDP traffic of ``parallelize`` layouts, measured against formulas.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/mesh_memory_traffic.py

1. Memory: per-rank bytes of parameters + AdamW moments (fp32) after one step, for one
   process and 2 and 4 Gloo processes under each layout (the DDP path ``ep=N`` and meshes),
   the largest rank against ``12 * (P_dense / d + P_experts / e)`` (d, e: how many ranks
   share the dense and the expert parameters; padding of uneven shards left out).
2. Traffic: the payload of every FSDP2 all-gather and reduce-scatter in one training step,
   counted by wrapping ``torch.distributed.all_gather_single`` / ``reduce_scatter_single``,
   against the formula computed from the parameter shapes (padding included).
3. The cost model of ``docs/distributed.md`` for DeepSeek-V3-like and Mixtral-like models on
   8-256 GPUs (printed from the same formulas; nothing of that size runs here).

Prints markdown tables (``docs/distributed.md`` quotes them).
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatelab.models import LM, LMConfig, MoEConfig
from gatelab.parallel import parallel_state, parallelize, unwrap

CONFIG = LMConfig(
    vocab_size=256,
    dim=128,
    num_layers=2,
    num_heads=4,
    max_seq_len=64,
    ffn_hidden_dim=256,
    moe=MoEConfig(num_experts=8, top_k=2, hidden_dim=256),
)
BATCH, SEQ = 8, 64
LAYOUTS = {
    1: [("one process", None)],
    2: [
        ("DDP, ep=1", 1),
        ("DDP, ep=2", 2),
        ("dp_shard=2", "dp_shard=2"),
        ("ep=2", "ep=2"),
        ("dp_replicate=2", "dp_replicate=2"),
    ],
    4: [
        ("DDP, ep=2", 2),
        ("DDP, ep=4", 4),
        ("dp_shard=4", "dp_shard=4"),
        ("dp_shard=2,ep=2", "dp_shard=2,ep=2"),
        ("ep=4", "ep=4"),
        ("dp_replicate=2,dp_shard=2", "dp_replicate=2,dp_shard=2"),
        ("dp_replicate=2,ep=2", "dp_replicate=2,ep=2"),
    ],
}


def _local_bytes(t) -> int:
    t = t.to_local() if hasattr(t, "to_local") else t
    return t.numel() * t.element_size()


class Counter:
    """Payload bytes of FSDP2's collectives (the unsharded size: all-gather output,
    reduce-scatter input), for groups of more than one rank."""

    def __init__(self):
        self.bytes = {"all_gather": 0, "reduce_scatter": 0}
        self._ag, self._rs = dist.all_gather_single, dist.reduce_scatter_single

        def all_gather_single(output_tensor, input_tensor, group=None, async_op=False):
            if dist.get_world_size(group) > 1:
                self.bytes["all_gather"] += _local_bytes(output_tensor)
            return self._ag(output_tensor, input_tensor, group=group, async_op=async_op)

        def reduce_scatter_single(output, input, op=dist.ReduceOp.SUM, group=None, async_op=False):
            if dist.get_world_size(group) > 1:
                self.bytes["reduce_scatter"] += _local_bytes(input)
            return self._rs(output=output, input=input, op=op, group=group, async_op=async_op)

        dist.all_gather_single, dist.reduce_scatter_single = (
            all_gather_single,
            reduce_scatter_single,
        )


def _padded(shape, size: int) -> int:
    rows = math.ceil(shape[0] / size) * size
    return rows * math.prod(shape[1:])


def fsdp_formula(model, state) -> dict[str, int]:
    """Payload bytes one step moves: every dense block gathered in forward and again in
    backward (resharded after forward), the root once, expert banks once (not resharded);
    every gradient reduce-scattered once. Groups of one rank move nothing."""
    spec = state.spec
    dense_group, expert_group = spec.dp_shard * spec.ep, spec.dp_shard
    if spec.dp_replicate > 1 and dense_group == 1:
        dense_group = 1  # replicate only: all-reduce, no all-gather
    core = unwrap(model)
    gather = scatter = 0
    block_ids = {id(p) for b in core.blocks for p in b.parameters()}
    for name, p in core.named_parameters():
        expert = name in state.expert_params
        size = expert_group if expert else dense_group
        if size == 1:
            continue
        n = _padded(p.shape, size) * 4
        times = 1 if expert or id(p) not in block_ids else 2
        gather, scatter = gather + times * n, scatter + n
    return {"all_gather": gather, "reduce_scatter": scatter}


def _worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    counter = Counter()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=gen)
    results = []
    for name, layout in LAYOUTS[world]:
        torch.manual_seed(0)
        model = LM(CONFIG)
        kind = "mesh" if isinstance(layout, str) else "ddp"
        model = parallelize(model, mesh=layout) if kind == "mesh" else parallelize(model, ep=layout)
        state = parallel_state(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        counter.bytes = dict.fromkeys(counter.bytes, 0)
        batch = state.shard_batch(ids)
        out_ = model(batch[:, :-1], batch[:, 1:])
        out_.loss.backward()
        state.finish_backward(model)
        opt.step()
        counted = dict(counter.bytes)
        params, moments = _held_bytes(model, opt)
        row = {"layout": name, "rank": rank, "params": params, "moments": moments}
        if kind == "mesh":
            row.update(counted=counted, formula=fsdp_formula(model, state))
        results.append(row)
        dist.barrier()
    Path(out, f"{world}_{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def _held_bytes(model, opt) -> tuple[int, int]:
    """(parameter bytes, AdamW moment bytes) this rank holds (local shards of DTensors)."""
    params = sum(_local_bytes(p) for p in model.parameters())
    moments = sum(
        _local_bytes(v)
        for s in opt.state.values()
        for v in s.values()
        if torch.is_tensor(v) and v.dim() >= 1
    )
    return params, moments


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single(out: str) -> None:
    torch.manual_seed(0)
    model = LM(CONFIG)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CONFIG.vocab_size, (BATCH, SEQ + 1), generator=gen)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(ids[:, :-1], ids[:, 1:]).loss.backward()
    opt.step()
    params, moments = _held_bytes(model, opt)
    row = {"layout": "one process", "rank": 0, "params": params, "moments": moments}
    Path(out, "1_0.json").write_text(json.dumps([row]))


def _counts() -> tuple[int, int]:
    model = LM(CONFIG)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    return sum(p.numel() for p in model.parameters()) - experts, experts


def memory_formula(layout, world: int) -> float:
    dense, experts = _counts()
    if layout is None:
        return 12 * (dense + experts)
    if not isinstance(layout, str):
        return 12 * (dense + experts / layout)
    from gatelab.parallel.mesh import MeshSpec

    spec = MeshSpec.parse(layout, world)
    return 12 * (dense / (spec.dp_shard * spec.ep) + experts / (spec.ep * spec.dp_shard))


def measure() -> None:
    with tempfile.TemporaryDirectory() as out:
        _single(out)
        for world in (2, 4):
            mp.start_processes(
                _worker, args=(world, _port(), out), nprocs=world, join=True, start_method="fork"
            )
        rows = {}
        for path in Path(out).glob("*.json"):
            world = int(path.stem.split("_")[0])
            for r in json.loads(path.read_text()):
                rows.setdefault((world, r["layout"]), []).append(r)
    dense, experts = _counts()
    print(
        f"model: LM D={CONFIG.dim}, {CONFIG.num_layers} layers, E={CONFIG.moe.num_experts}, "
        f"F={CONFIG.moe.hidden_dim}: {dense:,} dense + {experts:,} expert parameters\n"
    )
    print(
        "| ranks | layout | params + moments per rank, measured (max rank) | formula "
        "12 (P_d/d + P_e/e) | measured / formula |"
    )
    print("|---|---|---|---|---|")
    traffic = []
    for world in (1, 2, 4):
        for name, layout in LAYOUTS[world]:
            ranks = rows[(world, name)]
            worst = max(r["params"] + r["moments"] for r in ranks)
            formula = memory_formula(layout, world)
            print(f"| {world} | {name} | {worst:,} | {formula:,.0f} | {worst / formula:.3f} |")
            if "counted" in ranks[0]:
                traffic.append((world, name, ranks))
    print(
        "\n| ranks | layout | all-gather payload counted | formula | reduce-scatter "
        "payload counted | formula | equal |"
    )
    print("|---|---|---|---|---|---|---|")
    for world, name, ranks in traffic:
        r = ranks[0]
        c, f = r["counted"], r["formula"]
        same = all(x["counted"] == x["formula"] for x in ranks)
        print(
            f"| {world} | {name} | {c['all_gather']:,} | {f['all_gather']:,} | "
            f"{c['reduce_scatter']:,} | {f['reduce_scatter']:,} | {'yes' if same else 'NO'} |"
        )


# -- the cost model at sizes that do not run here --------------------------------------------

MODELS = {
    # name: (D, MoE layers, E, k, F, dense params, expert params); from the published configs
    # as remembered (approximate; see docs/distributed.md)
    "DeepSeek-V3-like": (7168, 58, 256, 8, 2048, 17.2e9, 653.8e9),
    "Mixtral-8x7B-like": (4096, 32, 8, 2, 14336, 1.6e9, 45.1e9),
}
NVLINK, IB, PER_NODE, TOKENS, S = 450e9, 50e9, 8, 4096, 2


def cost(model: str, world: int, ep: int) -> dict:
    d, layers, e, k, f, dense, experts = MODELS[model]
    shard = world // ep
    memory = 12 * (dense + experts) / world  # fp32 master + AdamW moments, fully sharded
    fsdp_dense = 3 * S * dense * (world - 1) / world  # AG fwd + AG bwd + RS
    fsdp_expert = 2 * S * experts / ep * (shard - 1) / shard  # AG once + RS
    a2a = layers * 4 * k * TOKENS * d * S * (ep - 1) / ep
    slow = NVLINK if world <= PER_NODE else IB
    a2a_link = NVLINK if ep <= PER_NODE else IB
    a2a_share = (ep - 1) / ep if ep <= PER_NODE else (ep - PER_NODE) / ep
    return {
        "memory_gb": memory / 1e9,
        "fsdp_gb": (fsdp_dense + fsdp_expert) / 1e9,
        "fsdp_s": (fsdp_dense + fsdp_expert) / slow,
        "a2a_gb": a2a / 1e9,
        "a2a_s": a2a * a2a_share / ((ep - 1) / ep) / a2a_link if ep > 1 else 0.0,
    }


def cost_table() -> None:
    print(
        f"\nper GPU and training step, {TOKENS} tokens per GPU, bf16 traffic, NVLink "
        f"{NVLINK / 1e9:.0f} GB/s within a node of {PER_NODE}, IB {IB / 1e9:.0f} GB/s between"
    )
    print(
        "\n| model | GPUs | mesh | params+AdamW GB/GPU | FSDP GB | FSDP s | all-to-all GB | "
        "all-to-all s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for model, (_, _, e, *_rest) in MODELS.items():
        for world in (8, 16, 32, 64, 128, 256):
            for ep in sorted({min(8, e, world), min(64, e, world)}):
                c = cost(model, world, ep)
                mesh = f"dp_shard={world // ep},ep={ep}"
                print(
                    f"| {model} | {world} | {mesh} | {c['memory_gb']:.0f} | "
                    f"{c['fsdp_gb']:.1f} | {c['fsdp_s']:.2f} | {c['a2a_gb']:.1f} | "
                    f"{c['a2a_s']:.2f} |"
                )


if __name__ == "__main__":
    if "--model-only" not in sys.argv:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        measure()
    cost_table()
