"""FSDP2 + expert parallelism on a device mesh (Gloo, 2 and 4 processes, fp32).

Every worker trains a tiny MoE LM a few AdamW steps under ``parallelize(model, mesh=...)``
and compares itself with one process on the full batch it computes from the same weights:
losses to 1e-6 and the same routing. One spawn per world size runs every mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import traceback

import pytest
import torch
import torch.distributed as dist
from test_distributed import _fork, _free_port, _init  # noqa: E402

from gatelab.models import LM, LMConfig, MoEConfig
from gatelab.parallel import parallel_state, parallelize, unwrap
from gatelab.parallel.mesh import MeshSpec

STEPS, BATCH, SEQ = 3, 4, 8
CONFIG = LMConfig(
    vocab_size=32,
    dim=16,
    num_layers=2,
    num_heads=2,
    max_seq_len=SEQ,
    ffn_hidden_dim=16,
    moe=MoEConfig(num_experts=4, top_k=2, hidden_dim=8, loss_weights={"balance": 0.01}),
)


# Rules where tokens compete for experts: capacity drops and expert choice.
CONFIGS = {
    "base": CONFIG,
    "capacity": dataclasses.replace(
        CONFIG, moe=dataclasses.replace(CONFIG.moe, capacity_factor=0.5)
    ),
    "two_experts": dataclasses.replace(
        CONFIG, moe=dataclasses.replace(CONFIG.moe, num_experts=2, top_k=1)
    ),
    "expert_choice": dataclasses.replace(
        CONFIG, moe=dataclasses.replace(CONFIG.moe, router="expert_choice")
    ),
}


def tiny_lm(config: str = "base") -> LM:
    torch.manual_seed(0)
    return LM(CONFIGS[config])


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, CONFIG.vocab_size, (STEPS, BATCH, SEQ + 1), generator=gen)
    return [(b[:, :-1], b[:, 1:]) for b in ids]


def _routing(model) -> list[torch.Tensor]:
    return [b.ffn.last_routing.experts for b in model.blocks]


def _step(model, ids, targets, state=None) -> tuple[float, float]:
    """(loss, gradient norm) of one step; clipped at 0.5, so a wrong norm changes the step."""
    out = model(ids, targets)
    (out.loss + out.aux_loss).backward()
    params = [p for p in model.parameters() if p.grad is not None]
    if state is None:
        return float(out.loss + out.aux_loss), float(torch.nn.utils.clip_grad_norm_(params, 0.5))
    state.finish_backward(model)
    norm = float(state.clip_grad_norm_(model, params, 0.5))
    return state.mean([float(out.loss + out.aux_loss)])[0], norm


def _optimizer(model):
    # SGD, not AdamW: Adam's update hardly changes when a gradient is scaled by a constant,
    # so it would hide a wrong gradient divide factor.
    return torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)


@functools.cache
def reference(config: str = "base") -> tuple[list, list[list[torch.Tensor]], dict]:
    """One process on the full batch: (loss, gradient norm) and the routing of each step,
    and the first step's gradients."""
    model = tiny_lm(config)
    opt = _optimizer(model)
    losses, routings, grads = [], [], {}
    for ids, targets in batches():
        losses.append(_step(model, ids, targets))
        routings.append(_routing(model))
        grads = grads or {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        opt.zero_grad()
    return losses, routings, grads


def check_mesh(spec: str | None, config: str = "base", **kwargs) -> None:
    """``parallelize(mesh=spec, **kwargs)`` (spec None: the DDP path, ``ep=`` in kwargs)
    trains as one process on the full batch does."""
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = reference(config)
    model = parallelize(tiny_lm(config), mesh=spec, **kwargs)
    state = parallel_state(model)
    if config == "two_experts":  # one expert per EP rank, 2 dp_shard ranks: split dim 1
        bank = dict(unwrap(model).named_parameters())["blocks.0.ffn.experts.down_proj"]
        assert [p.dim for p in bank.placements] == [1]
    opt = _optimizer(model)
    rows = slice(rank * BATCH * SEQ // world, (rank + 1) * BATCH * SEQ // world)
    for step, (ids, targets) in enumerate(batches()):
        got = _step(model, state.shard_batch(ids), state.shard_batch(targets), state)
        where = f"mesh {spec}, {config}, {kwargs}, rank {rank}, step {step}"
        (loss, norm), (ref_loss, ref_norm) = got, ref[0][step]
        assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-6), (where, loss, ref_loss)
        # The norm sums squares in another order (per shard, then over ranks): 1e-5.
        assert norm == pytest.approx(ref_norm, rel=1e-5), (where, norm, ref_norm)
        for mine, full in zip(_routing(unwrap(model)), ref[1][step], strict=True):
            assert torch.equal(mine, full[rows]), f"routing, {where}"
        if step == 0:
            _check_grads(model, state, ref[2], where)
        opt.step()
        opt.zero_grad()


def _check_grads(model, state, ref_grads: dict, where: str) -> None:
    """Every gradient (made whole; this EP rank's experts) equals one process's: the loss
    alone would hide a wrong scale on small gradients such as the experts'."""
    for name, p in unwrap(model).named_parameters():
        grad, want = p.grad, ref_grads[name]
        grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
        if name in state.expert_params:
            per = want.shape[0] // state.ep
            want = want[state.ep_rank * per : (state.ep_rank + 1) * per]
        torch.testing.assert_close(grad, want, rtol=1e-5, atol=1e-7, msg=f"grad {name}, {where}")


def _check_local_capacity_differs() -> None:
    """Without global_routing, capacity decides per rank: the routing is not the single
    process's (what makes the global option worth having, and the test above meaningful)."""
    model = parallelize(tiny_lm("capacity"), mesh="dp_shard=2")
    state, (ids, targets) = parallel_state(model), batches()[0]
    model(state.shard_batch(ids), state.shard_batch(targets))
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = slice(rank * BATCH * SEQ // world, (rank + 1) * BATCH * SEQ // world)
    ref = reference("capacity")[1][0]
    same = [torch.equal(a, b[rows]) for a, b in zip(_routing(model), ref, strict=True)]
    mismatch = torch.tensor([float(not all(same))])
    dist.all_reduce(mismatch)
    assert mismatch.item() > 0


def _worker(rank: int, port: int, world: int, specs: list[tuple[str, dict]]) -> None:
    _init(rank, port, world)
    try:
        if world == 2:
            with pytest.raises(ValueError, match="either mesh"):
                parallelize(tiny_lm(), ep=2, mesh="ep=2")
            with pytest.raises(ValueError, match="needs GPUs"):
                parallelize(tiny_lm(), mesh="dp_shard=2", mp_policy="bf16")
            with pytest.raises(ValueError, match="use 'bf16'"):
                parallelize(tiny_lm(), mesh="dp_shard=2", mp_policy="fp8")
            _check_local_capacity_differs()
        for spec, kwargs in specs:
            check_mesh(spec, **kwargs)
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def test_two_processes_fsdp_ep_and_both_equal_one_process():
    """W=2: FSDP2 alone (dp_shard=2, also without resharding after forward), EP with the
    rest FSDP-sharded over both ranks (ep=2), HSDP replicas (dp_replicate=2)."""
    specs = [
        ("dp_shard=2", {}),
        ("dp_shard=2", {"reshard_after_forward": False}),
        ("ep=2", {}),
        ("dp_replicate=2", {}),
        ("ep=2", {"config": "capacity", "global_routing": True}),
        ("dp_shard=2", {"config": "expert_choice", "global_routing": True}),
        (None, {"config": "capacity", "global_routing": True, "ep": 2}),
        (None, {"config": "expert_choice", "global_routing": True, "ep": 1}),
    ]
    _fork(_worker, (_free_port(), 2, specs), 2)


def test_four_processes_fsdp_with_ep_equal_one_process():
    """W=4: experts sharded over ep=2 and fully sharded over dp_shard=2; HSDP with EP and
    with FSDP; EP over all 4 ranks with global capacity."""
    specs = [
        ("dp_shard=2,ep=2", {}),
        ("dp_replicate=2,ep=2", {}),
        ("dp_replicate=2,dp_shard=2", {}),
        ("ep=4", {"config": "capacity", "global_routing": True}),
        ("dp_shard=2,ep=2", {"config": "two_experts"}),  # 1 expert per EP rank: dim-1 shards
    ]
    _fork(_worker, (_free_port(), 4, specs), 4)


@pytest.mark.parametrize(
    ("text", "world", "message"),
    [
        ("dp_shard=2,tp=2", 4, "unknown dimension 'tp'"),
        ("dp_shard=2,ep=2", 2, "has 4 ranks but the job has 2 processes"),
        ("dp_shard=0", 1, "positive size"),
        ("dp_shard=two", 2, "positive size"),
        ("ep=2,ep=2", 4, "given twice"),
        ("dp_shard=-1,ep=-1", 4, "only one dimension may be -1"),
        ("dp_shard=-1,ep=3", 4, "do not divide by 3"),
        ("", 1, "NAME=SIZE"),
    ],
)
def test_mesh_spec_errors_name_the_problem(text, world, message):
    with pytest.raises(ValueError, match=message):
        MeshSpec.parse(text, world).check(world)


def test_mesh_spec_fills_minus_one_and_checks_experts():
    assert MeshSpec.parse("dp_shard=-1,ep=2", 8) == MeshSpec(1, 4, 2)
    assert MeshSpec.parse(" dp_replicate = 2 , dp_shard=2 ").world == 4
    with pytest.raises(ValueError, match="num_experts=6, not divisible by ep=4"):
        MeshSpec(ep=4).check(4, {"blocks.0.ffn": 6})
