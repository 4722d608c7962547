"""Checkpoints of an expert-parallel run: whole expert banks on disk, shards in memory.

Under ``gatelab.parallelize(model, ep=...)`` each rank holds ``E/ep`` experts of every MoE
layer (``ParallelState.expert_params`` names those parameters). A checkpoint always stores
the whole banks, so it loads under any expert-parallel size, one process included:

- saving, every rank calls :func:`gather_expert_banks` (a collective over each EP group)
  and rank 0 writes what it returns;
- loading, :func:`shard_expert_banks` is ``load_checkpoint``'s ``transform``: it cuts this
  rank's experts (and their AdamW moments) out of the whole checkpoint before it is checked
  and applied.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["gather_expert_banks", "shard_expert_banks"]


def _is_expert_tensor(parallel, value: Any, name: str, whole: bool = False) -> bool:
    """A tensor of ``name``'s bank: its first dimension counts the experts (all of them when
    ``whole``, this rank's ``E/ep`` otherwise); AdamW's scalar ``step`` is not one."""
    experts = parallel.expert_params[name] // (1 if whole else parallel.ep)
    return isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == experts


def _shard(parallel, tensor: Tensor, name: str) -> Tensor:
    per = parallel.expert_params[name] // parallel.ep
    return tensor[parallel.ep_rank * per : (parallel.ep_rank + 1) * per].clone()


def _optimizer_order(model: nn.Module, optimizer) -> list[str | None]:
    """The model's name of each optimizer parameter, in the optimizer state's index order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names.get(id(p)) for g in optimizer.param_groups for p in g["params"]]


@torch.no_grad()
def gather_expert_banks(parallel, model: nn.Module, optimizer) -> tuple[dict, dict | None]:
    """The model's and optimizer's state dicts with every expert bank whole.

    Every rank calls it (the gathers are collectives); rank 0 passes the result to
    ``save_checkpoint(model_state=..., optimizer_state=...)``. ``model`` is the unwrapped
    module (its ``state_dict`` names are the single-device model's).
    """
    model_state = model.state_dict()
    for name in sorted(parallel.expert_params):
        model_state[name] = parallel.gather_experts(model_state[name])
    if optimizer is None:
        return model_state, None
    optim_state = optimizer.state_dict()
    for index, name in enumerate(_optimizer_order(model, optimizer)):
        state = optim_state["state"].get(index)
        if name not in parallel.expert_params or state is None:
            continue
        optim_state["state"][index] = {
            key: parallel.gather_experts(v) if _is_expert_tensor(parallel, v, name) else v
            for key, v in state.items()
        }
    return model_state, optim_state


def shard_expert_banks(
    parallel, meta: dict, tensors: dict[str, Tensor]
) -> tuple[dict, dict[str, Tensor]]:
    """``load_checkpoint(transform=functools.partial(shard_expert_banks, parallel))``: cut
    this rank's experts out of a whole checkpoint (written under any EP size)."""
    tensors = dict(tensors)
    for name in parallel.expert_params:
        key = f"model/{name}"
        if key in tensors and _is_expert_tensor(parallel, tensors[key], name, whole=True):
            tensors[key] = _shard(parallel, tensors[key], name)
    optimizer = meta.get("optimizer") or {}
    order = [n for group in optimizer.get("param_names", []) for n in group]
    state = (optimizer.get("state_dict") or {}).get("state") or {}
    for index, entry in (state.get("__int_keys__") or {}).items():
        name = order[int(index)] if int(index) < len(order) else None
        if name not in parallel.expert_params:
            continue
        for ref in entry.values():
            key = ref.get("__tensor__") if isinstance(ref, dict) else None
            if key in tensors and _is_expert_tensor(parallel, tensors[key], name, whole=True):
                tensors[key] = _shard(parallel, tensors[key], name)
    return meta, tensors
