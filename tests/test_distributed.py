"""Expert parallelism and multi-process training on torch.distributed (Gloo, 2 processes).

Spawning processes costs seconds each, so one spawn runs every layer-level case and one
torchrun runs the training case; each worker compares itself with a single-process
reference it computes from the same weights, and raises on a mismatch.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import shutil
import socket
import subprocess
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gatelab import ExpertBank, MoE
from gatelab.dispatch import ExpertParallel, layer_bytes, loop_dispatch
from gatelab.parallel import GlobalRouting, parallel_state, parallelize
from gatelab.routing import EMPTY, LOSSES, ROUTERS

WORLD = 2


def _fork(worker, args: tuple, nprocs: int) -> None:
    """Start the workers by fork (no re-import: seconds saved per process), after importing
    here what torch imports lazily on first use (backward, assert_close, DDP)."""
    import torch.distributed.tensor  # noqa: F401
    import torch.fx.experimental.symbolic_shapes  # noqa: F401

    mp.start_processes(worker, args=args, nprocs=nprocs, join=True, start_method="fork")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, port: int, world: int = WORLD) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )


# -- layer cases --------------------------------------------------------------------------

E, D, F, K = 4, 6, 5, 2


def _routing(case: str, sizes: list[int], gen: torch.Generator) -> torch.Tensor:
    """Global [T, K] experts for a case; T = sum(sizes)."""
    t = sum(sizes)
    experts = torch.argsort(torch.rand(t, E, generator=gen), dim=1)[:, :K]
    if case == "skewed":  # every token to the experts of rank 0
        experts = torch.stack([torch.zeros(t), torch.ones(t)], dim=1).long()
    elif case == "empty_slots":  # some slots empty, expert 3 never chosen
        experts = torch.where(experts == 3, EMPTY, experts)
    elif case == "all_empty":
        experts = torch.full((t, K), EMPTY)
    return experts


CASES = {
    "random": [5, 7],
    "skewed": [6, 3],
    "empty_rank": [8, 0],
    "empty_slots": [4, 4],
    "all_empty": [3, 2],
    "nobody": [0, 0],
}


def _check_case(case: str, sizes: list[int], rank: int, local: str) -> None:
    gen = torch.Generator().manual_seed(list(CASES).index(case))
    t = sum(sizes)
    x = torch.randn(t, D, generator=gen, dtype=torch.float64)
    experts = _routing(case, sizes, gen)
    weights = (torch.rand(t, K, generator=gen, dtype=torch.float64) + 0.1).masked_fill(
        experts == EMPTY, 0.0
    )
    grad_out = torch.randn(t, D, generator=gen, dtype=torch.float64)
    bank = ExpertBank(E, D, F, bias=True).double()
    with torch.no_grad():
        for p in bank.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))

    # The single-process layer on all tokens.
    ref_x, ref_w = x.clone().requires_grad_(), weights.clone().requires_grad_()
    ref_out = loop_dispatch(ref_x, experts, ref_w, bank.weights())
    ref_out.backward(grad_out)
    ref_bank_grads = [p.grad.clone() for p in bank.parameters()]

    # This rank's tokens through the expert-parallel dispatcher with this rank's experts.
    rows = slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))
    per = E // WORLD
    shard = ExpertBank(per, D, F, bias=True).double()
    with torch.no_grad():
        for mine, full in zip(shard.parameters(), bank.parameters(), strict=True):
            mine.copy_(full[rank * per : (rank + 1) * per])
    ep = ExpertParallel(local=local)
    my_x, my_w = x[rows].clone().requires_grad_(), weights[rows].clone().requires_grad_()
    out = ep(my_x, experts[rows], my_w, shard.weights())
    out.backward(grad_out[rows])

    where = f"case {case!r}, local {local!r}, rank {rank}"
    torch.testing.assert_close(out, ref_out[rows].detach(), msg=f"forward, {where}")
    torch.testing.assert_close(my_x.grad, ref_x.grad[rows], msg=f"grad x, {where}")
    torch.testing.assert_close(my_w.grad, ref_w.grad[rows], msg=f"grad weights, {where}")
    for mine, full in zip(shard.parameters(), ref_bank_grads, strict=True):
        torch.testing.assert_close(
            mine.grad, full[rank * per : (rank + 1) * per], msg=f"grad experts, {where}"
        )
    # Bytes leaving this rank: its rows for remote experts out, other ranks' rows back.
    sent = int(((experts[rows] >= 0) & (experts[rows] // per != rank)).sum())
    others = torch.ones(t, dtype=torch.bool)
    others[rows] = False
    received = int(((experts[others] >= 0) & (experts[others] // per == rank)).sum())
    assert ep.counters["remote_rows"] == sent, where
    assert ep.counters["forward_bytes"] == (sent + received) * D * 8, where
    formula = layer_bytes(sent, received, D, 8)
    assert {k: ep.counters[k] for k in formula} == formula, where


def _check_moe_layer(rank: int, ep: int = WORLD) -> None:
    """A whole MoE layer (router, aux losses on the global batch, shared expert) under
    parallelize equals the single-process layer on the full batch, for the mean loss."""
    world = dist.get_world_size()
    torch.manual_seed(3)
    layer = MoE(D, F, E, K, shared_hidden_dim=4, loss_weights={"balance": 0.1, "z": 0.01}).double()
    x = torch.randn(2 * world, 3, D, dtype=torch.float64)
    ref = MoE(D, F, E, K, shared_hidden_dim=4, loss_weights={"balance": 0.1, "z": 0.01}).double()
    ref.load_state_dict(layer.state_dict())
    ref_out = ref(x)
    (ref_out.square().mean() + ref.aux_loss).backward()

    model = parallelize(layer, ep=ep)
    state = parallel_state(model)
    mine = state.shard_batch(x)
    out = model(mine)
    (out.square().mean() + layer.aux_loss).backward()
    state.finish_backward(model)
    rows = slice(rank * 2, rank * 2 + 2)
    torch.testing.assert_close(out, ref_out[rows].detach())
    torch.testing.assert_close(layer.aux_loss.detach(), ref.aux_loss.detach())
    per, ep_rank = E // ep, rank % ep
    ref_params = dict(ref.named_parameters())
    for name, p in layer.named_parameters():
        want = ref_params[name].grad
        if name in state.expert_params:
            want = want[ep_rank * per : (ep_rank + 1) * per]
        torch.testing.assert_close(p.grad, want, msg=f"grad {name}, rank {rank}")
    # Gradient norm over all shards equals the single-process norm.
    params = list(layer.parameters())
    norm = state.clip_grad_norm_(model, params, 1e9)
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    torch.testing.assert_close(norm.double(), ref_norm.double())
    # A copy (EMA, averaging) shares the process groups instead of failing to copy them.
    clone = copy.deepcopy(layer)
    assert clone.dispatcher is layer.dispatcher and parallel_state(clone) is state


def _check_bias_counts(rank: int) -> None:
    """The aux-loss-free bias moves by the token counts of the global batch."""
    kwargs = {"router": "sigmoid", "router_kwargs": {"bias_update_rate": 0.01}}
    torch.manual_seed(5)
    layer = MoE(D, F, E, K, **kwargs).double()
    ref = MoE(D, F, E, K, **kwargs).double()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(2 * WORLD, 3, D, dtype=torch.float64)
    ref(x)
    ref.router.update_bias()
    model = parallelize(layer, ep=WORLD, data_parallel=False)
    state = parallel_state(model)
    model(state.shard_batch(x))
    state.before_optimizer_step(model)
    layer.router.update_bias()
    assert ref.router.expert_bias.abs().sum() > 0
    torch.testing.assert_close(layer.router.expert_bias, ref.router.expert_bias)


def _check_errors(rank: int) -> None:
    with pytest.raises(ValueError, match="not divisible by ep=2"):
        parallelize(MoE(D, F, 3, 1), ep=2)
    with pytest.raises(ValueError, match="divisor of the world size"):
        parallelize(MoE(D, F, 4, 1), ep=3)
    ep = ExpertParallel()
    with pytest.raises(ValueError, match="not divisible by the expert-parallel size"):
        ep.local_experts(5)


def _check_global_routing(rank: int) -> None:
    """Every registered loss of the gathered routing equals the loss of the full batch."""
    gen = torch.Generator().manual_seed(11)
    logits = torch.randn(9, E, generator=gen)
    mask = torch.rand(9, generator=gen) > 0.3
    router = ROUTERS.get("topk")(E, E, K)
    with torch.no_grad():
        router.weight.copy_(torch.eye(E))
    full = router(logits)
    rows = slice(0, 4) if rank == 0 else slice(4, 9)
    gathered, gathered_mask = GlobalRouting()(router(logits[rows]), mask[rows])
    assert torch.equal(gathered_mask, mask)
    for name, fn in LOSSES.items():
        torch.testing.assert_close(fn(gathered, mask), fn(full, mask), msg=name)


def _check_reshard(rank: int, checkpoint: str) -> None:
    """1 -> 2: a single-process checkpoint loads into a 2-rank model (each rank its
    experts), and gathering the shards gives back the checkpoint's tensors."""
    from gatelab.recipes import load_recipe
    from gatelab.recipes.run import build_run
    from gatelab.train.checkpoint import load_checkpoint, read_checkpoint
    from gatelab.train.sharded import gather_expert_banks, shard_expert_banks

    meta, tensors = read_checkpoint(checkpoint)
    run = build_run(load_recipe("moe-lm", SMALL))
    model = run.model
    run.model = parallelize(model, ep=WORLD)
    trainer = run.trainer()
    state = parallel_state(run.model)
    reshard = functools.partial(shard_expert_banks, state)
    load_checkpoint(checkpoint, model, trainer.optimizer, rng=False, transform=reshard)
    per = 4 // WORLD
    for name in state.expert_params:
        want = tensors[f"model/{name}"][rank * per : (rank + 1) * per]
        torch.testing.assert_close(model.get_parameter(name).detach(), want, rtol=0, atol=0)
    model_state, optim_state = gather_expert_banks(state, model, trainer.optimizer)
    for name, value in model_state.items():
        torch.testing.assert_close(value, tensors[f"model/{name}"], rtol=0, atol=0)
    assert optim_state["state"], "the optimizer state was not restored"


# -- training -----------------------------------------------------------------------------

SMALL = [
    "model.dim=32",
    "model.num_layers=2",
    "model.num_heads=2",
    "model.max_seq_len=32",
    "model.num_experts=4",
    "model.expert_hidden_dim=32",
    "data.seq_len=16",
    "data.batch_size=4",
    "data.eval_batches=1",
    "train.steps=2",
    "train.warmup_steps=1",
    "train.eval_every=0",
    "train.save_every=1",
    "train.routing_every=1",
    "train.progress=false",
]


def _run_args(run_dir: Path) -> list[str]:
    return [*SMALL, f'train.run_dir="{run_dir}"']


def _worker(rank: int, port: int, checkpoint: str, run_dir: str, resume_dir: str) -> None:
    """Every layer case, the 1 -> 2 reshard, the 2-process training run, and a 2-process
    resume of the single-process run from its step-1 checkpoint."""
    from gatelab.recipes.run import run_recipe

    _init(rank, port)
    try:
        for local in ("grouped", "loop"):
            for case, sizes in CASES.items():
                _check_case(case, sizes, rank, local)
        _check_moe_layer(rank)
        _check_global_routing(rank)
        _check_bias_counts(rank)
        _check_errors(rank)
        _check_reshard(rank, checkpoint)
        run_recipe("moe-lm", _run_args(Path(run_dir)), ep=WORLD)
        run_recipe("moe-lm", _run_args(Path(resume_dir)), resume=True, ep=WORLD)
    except BaseException:
        # spawn reports one rank's error; the first failure may be on the other rank.
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines if '"train"' in line]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    """The shrunk moe-lm recipe trained 2 steps in this process (the reference)."""
    from gatelab.recipes.run import run_recipe

    run_dir = tmp_path_factory.mktemp("single") / "run"
    result = run_recipe("moe-lm", _run_args(run_dir))
    assert result.stopped == "completed"
    return run_dir, result


@pytest.fixture(scope="module")
def two_processes(single_run, tmp_path_factory):
    """One spawn of 2 Gloo processes for all the distributed checks (spawning costs
    seconds); returns the run directory of their training run."""
    base = tmp_path_factory.mktemp("ep2")
    run_dir, resume_dir = base / "run", base / "resume"
    # The single-process run's step-1 checkpoint, for the 2-process run to resume (1 -> 2).
    (resume_dir / "checkpoints").mkdir(parents=True)
    for path in (single_run[0] / "checkpoints").glob("step_00000001*"):
        shutil.copy(path, resume_dir / "checkpoints")
    args = (_free_port(), str(single_run[1].checkpoint), str(run_dir), str(resume_dir))
    _fork(_worker, args, WORLD)
    return run_dir


def test_expert_parallel_matches_single_process(two_processes):
    """In the workers (float64, same weights and routing): the EP dispatcher's forward,
    input, routing-weight and expert gradients and byte counters for random and skewed
    routing, empty ranks, empty slots and idle experts, with grouped and loop local
    dispatch; a parallelized MoE layer with aux losses and a shared expert; the aux
    losses of the gathered routing; the errors; and 1 -> 2 checkpoint resharding. A
    mismatch in any of them fails the spawn, hence this test."""
    assert (two_processes / "metrics.jsonl").exists()


def test_two_processes_resume_a_single_process_checkpoint(single_run, two_processes):
    """1 -> 2 mid-run: 2 processes resume the single-process run at step 1 (experts and
    their AdamW moments resharded) and take the step it took."""
    from gatelab.train.metrics import read_jsonl

    resumed = read_jsonl(two_processes.parent / "resume" / "metrics.jsonl")
    single = read_jsonl(single_run[0] / "metrics.jsonl")
    assert [r["step"] for r in resumed if r["kind"] == "train"] == [2]
    assert resumed[0]["loss"] == pytest.approx(single[1]["loss"], rel=1e-5)
    assert resumed[0]["grad_norm"] == pytest.approx(single[1]["grad_norm"], rel=1e-5)


def test_two_process_training_matches_single_process(single_run, two_processes):
    """moe-lm trained 2 steps by 2 processes with --ep 2 (global batch split over the
    ranks) logs the losses, aux losses and gradient norms of the single-process run on
    the full batch; its checkpoint loads into one process (2 -> 1) with the
    single-process run's parameters; its routing telemetry counts every rank's tokens."""
    from gatelab.recipes import load_recipe
    from gatelab.recipes.run import build_run
    from gatelab.train.checkpoint import load_checkpoint
    from gatelab.train.metrics import read_jsonl

    single_dir, single = single_run
    ours = [r for r in read_jsonl(two_processes / "metrics.jsonl") if r["kind"] == "train"]
    theirs = [r for r in read_jsonl(single_dir / "metrics.jsonl") if r["kind"] == "train"]
    assert len(ours) == len(theirs) == 2
    for key in ("loss", "aux", "grad_norm", "tokens"):
        assert [r[key] for r in ours] == pytest.approx([r[key] for r in theirs], rel=1e-5), key

    evals = [read_jsonl(d / "metrics.jsonl")[-1] for d in (two_processes, single_dir)]
    assert evals[0]["kind"] == evals[1]["kind"] == "eval"
    assert evals[0].keys() == evals[1].keys()
    numbers = [{k: v for k, v in e.items() if k != "kind"} for e in evals]
    assert numbers[0] == pytest.approx(numbers[1], rel=1e-5)

    routing = read_jsonl(two_processes / "routing.jsonl")
    for a, b in zip(routing, read_jsonl(single_dir / "routing.jsonl"), strict=True):
        for name, stats in a["layers"].items():
            assert stats["tokens_per_expert"] == b["layers"][name]["tokens_per_expert"], name

    run = build_run(load_recipe("moe-lm", SMALL))
    assert load_checkpoint(two_processes / "checkpoints", run.model, rng=False).step == 2
    reference = build_run(load_recipe("moe-lm", SMALL)).model
    load_checkpoint(single.checkpoint, reference, rng=False)
    for (name, p), q in zip(run.model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def _four_worker(rank: int, port: int) -> None:
    """4 ranks: EP groups {0,1}, {2,3} with expert-data-parallel groups {0,2}, {1,3}; and
    EP over all 4 ranks (one expert each)."""
    _init(rank, port, world=4)
    try:
        _check_moe_layer(rank, ep=2)
        _check_moe_layer(rank, ep=4)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def test_expert_data_parallel_groups_with_four_processes():
    """W=4, ep=2: expert gradients summed over the ranks holding the same shard; W=4,
    ep=4; each against the single-process layer (float64)."""
    _fork(_four_worker, (_free_port(),), 4)


def test_ep_traffic_experiment_smoke(tmp_path):
    """The docs' traffic check: each layer's byte counters equal the formula."""
    from gatelab import experiments

    result = experiments.get("ep-traffic").run("smoke", 0, tmp_path)
    assert result["all_equal"], result["table"]
    assert "counter = formula" in result["table"]


@pytest.mark.slow
def test_torchrun_cli(single_run, tmp_path):
    """``torchrun --nproc_per_node=2 -m gatelab train moe-lm --ep 2`` on Gloo logs the
    single-process run's losses."""
    torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not on PATH")
    run_dir = tmp_path / "run"
    command = [
        torchrun,
        "--nproc_per_node=2",
        "--master_port",
        str(_free_port()),
        "-m",
        "gatelab",
        "train",
        "moe-lm",
        "--ep",
        "2",
        *(arg for o in _run_args(run_dir) for arg in ("--set", o)),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])["step"] == 2
    assert _losses(run_dir) == pytest.approx(_losses(single_run[0]), rel=1e-5)


def test_parallelize_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="torchrun"):
        parallelize(MoE(D, F, E, K))
    with pytest.raises(RuntimeError, match="torchrun"):
        ExpertParallel()


def test_ep_flag_without_torchrun_is_a_clear_error(tmp_path, monkeypatch, capsys):
    from gatelab.cli import main

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "moe-lm", "--ep", "2", "--set", f'train.run_dir="{tmp_path}"']) == 2
    assert "torchrun --nproc_per_node=2" in capsys.readouterr().err
