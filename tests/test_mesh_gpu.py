"""FSDP2 mixed precision on a GPU (skipped without CUDA): bf16 parameters in forward and
backward, bf16 gradient reductions, fp32 master weights that the optimizer steps."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist

from gatelab.parallel import parallel_state, parallelize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def nccl_group():
    from test_distributed import _free_port  # noqa: E402

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    torch.cuda.set_device(0)
    dist.init_process_group(
        "nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    yield
    dist.destroy_process_group()


def test_bf16_parameters_and_fp32_master_weights(nccl_group):
    from test_mesh import batches, tiny_lm  # noqa: E402

    ref = tiny_lm().cuda()
    model = parallelize(copy.deepcopy(ref), mesh="dp_shard=1", mp_policy="bf16")
    seen = []
    model.blocks[0].attn.register_forward_pre_hook(
        lambda m, args: seen.append({p.dtype for p in m.parameters()})
    )
    ids, targets = (t.cuda() for t in batches()[0])
    out = model(ids, targets)
    (out.loss + out.aux_loss).backward()
    assert seen == [{torch.bfloat16}]  # gathered in bf16 for the forward
    master = list(model.parameters())
    assert {p.dtype for p in master} == {torch.float32}  # the sharded master copy
    assert {p.grad.dtype for p in master if p.grad is not None} == {torch.float32}
    ref_loss = ref(ids, targets).loss
    assert float(out.loss) == pytest.approx(float(ref_loss), rel=2e-2)
    opt = torch.optim.AdamW(master, lr=1e-3)
    opt.step()
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert parallel_state(model).spec.world == 1
