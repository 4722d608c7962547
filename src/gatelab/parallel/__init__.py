"""``gatelab.parallelize``: expert and data parallelism applied to a model from outside.

Module code stays single-device (DESIGN.md; torchtitan applies parallelism the same way).
``parallelize(model, ep=...)`` on every rank of an initialised ``torch.distributed`` job:

- broadcasts rank 0's parameters and buffers, so every rank starts from one model;
- shards each gatelab ``MoE`` layer's expert bank over an expert-parallel group of ``ep``
  consecutive ranks (experts ``[r * E/ep, (r + 1) * E/ep)`` on EP rank r) and installs
  :class:`~gatelab.dispatch.ExpertParallel` as the layer's dispatcher;
- wraps the model in ``DistributedDataParallel`` for every other parameter (experts are
  ignored by DDP: their gradients already arrive whole through the all-to-all; they are
  summed over the ranks holding the same shard, the expert-data-parallel group, and
  scaled by 1 / world size in :meth:`ParallelState.finish_backward`);
- computes the MoE layers' aux losses on the routing of the global batch (gathered from
  all ranks, see :class:`GlobalRouting`), so balance terms match a single process.

Each rank trains on its own shard of every batch (:meth:`ParallelState.shard_batch`):
the data iterator yields the same global batch on every rank, rank r takes rows
``[r * B/W, (r + 1) * B/W)``. With equal token counts per shard, mean-of-rank-means is the
global mean, so losses and gradients equal one process on the full batch.

``parallelize(model, mesh="dp_shard=2,ep=2")`` shards instead with FSDP2 on a device mesh
(:mod:`gatelab.parallel.fsdp`, :mod:`gatelab.parallel.mesh`). The aux-loss-free bias
counts and the routing telemetry are summed over all ranks before use.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..dispatch.expert_parallel import ExpertParallel
from ..routing import Routing
from ..routing.aux_free import biased_routers

__all__ = [
    "GlobalRouting",
    "ParallelState",
    "init_distributed",
    "parallel_state",
    "parallelize",
    "unwrap",
]

_STATE_ATTR = "_gatelab_parallel"


def init_distributed(backend: str | None = None) -> bool:
    """Initialise the default process group from torchrun's environment, once.

    Returns True when a process group is (now) initialised. Without torchrun's variables
    (``RANK``, ``WORLD_SIZE``) nothing is done and False is returned. The backend is NCCL
    when CUDA is available, else Gloo; on CUDA each process takes GPU ``LOCAL_RANK``.
    """
    if dist.is_initialized():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return True


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def parallel_state(model: nn.Module) -> ParallelState | None:
    """The :class:`ParallelState` ``parallelize`` attached to ``model``, or None."""
    return getattr(unwrap(model), _STATE_ATTR, None)


class _GatherRows(torch.autograd.Function):
    """All-gather rows [T_r, C] of every rank (T_r may differ) -> [sum T_r, C].

    Backward: every rank computes the same loss of the gathered rows, so the true adjoint
    (the sum over ranks of each rank's gradient for this rank's rows) is ``world`` times
    the local gradient; that is returned without a collective in backward, which keeps
    the backward free of collectives whose order could differ between ranks.
    """

    @staticmethod
    def forward(ctx, rows, sizes, rank, group):
        ctx.span = (sum(sizes[:rank]), sizes[rank], len(sizes))
        return _gather_rows(rows, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        start, count, world = ctx.span
        return grad[start : start + count] * world, None, None, None


def _gather_rows(rows: Tensor, sizes: list[int], group) -> Tensor:
    """Gloo's all_gather needs equal shapes: pad to the largest rank, then cut."""
    longest = max(sizes)
    padded = rows.new_zeros((longest, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)])


class GlobalRouting:
    """``MoE.aux_loss_routing`` hook: the Routing of the global batch (all ranks' tokens).

    The aux losses (switch balance, z, importance, load) are functions of statistics
    over tokens; computed per rank and averaged they are not those of the full batch
    (the balance loss is a product of two means). Gathering logits, scores, slot weights,
    experts and the token mask makes every rank compute the loss of the global batch,
    which is what one process on the full batch computes. Cost per MoE layer and forward:
    ``T * (2E + K)`` floats and ``T * (K + 1)`` ints gathered; experts' scores are small
    next to the token rows the all-to-all moves (E < D in practice).
    """

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)

    def __deepcopy__(self, memo) -> GlobalRouting:
        return self  # holds a process group handle, shared by copies of the model

    def __call__(self, routing: Routing, token_mask: Tensor | None):
        num_experts, num_slots = routing.num_experts, routing.num_slots
        size = torch.tensor([routing.num_tokens], device=routing.logits.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world)]
        dist.all_gather(sizes, size, group=self.group)
        sizes = [int(s) for s in sizes]
        floats = torch.cat(
            [routing.logits, routing.scores, routing.weights.to(routing.logits.dtype)], dim=1
        )
        floats = _GatherRows.apply(floats, sizes, self.rank, self.group)
        mask = (
            torch.ones(routing.num_tokens, dtype=torch.bool, device=routing.experts.device)
            if token_mask is None
            else token_mask.reshape(-1).bool()
        )
        ints = torch.cat([routing.experts, mask.long().unsqueeze(1)], dim=1)
        ints = _gather_rows(ints, sizes, self.group)
        logits, scores, weights = floats.split([num_experts, num_experts, num_slots], dim=1)
        gathered = Routing(
            logits, scores, ints[:, :num_slots], weights.to(routing.weights.dtype), {}, check=False
        )
        return gathered, (None if token_mask is None else ints[:, num_slots].bool())


class ParallelState:
    """What a parallelized model needs besides its forward; attached by :func:`parallelize`.

    Process groups and collectives only; what they are applied to lives with its owner
    (checkpoints gather and cut expert banks in :mod:`gatelab.train.sharded`, telemetry
    sums its counts with ``RoutingMonitor.reduce(state.sum_over_ranks)``). The trainer calls:
    :meth:`shard_batch` on each batch, :meth:`finish_backward` after the backward passes,
    :meth:`clip_grad_norm_`, :meth:`before_optimizer_step` (aux-free router counts),
    :meth:`mean` for logged numbers, :meth:`sum_over_ranks` for telemetry, :meth:`gather_experts` when
    saving, and :meth:`agree` to stop all ranks at the same step.

    ``expert_params`` maps each sharded expert parameter's name (as in the unwrapped
    model's ``state_dict``) to its layer's global ``num_experts``; this rank holds experts
    ``[ep_rank * E/ep, (ep_rank + 1) * E/ep)`` of each.
    """

    def __init__(self, ep: int, expert_params: dict[str, int]):
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.ep = ep
        self.ep_rank = self.rank % ep
        # Every rank creates every group, in the same order (new_group is collective).
        self.world_group = dist.new_group(list(range(self.world)))
        # Python numbers (logged losses, stop flags, telemetry) travel as CPU tensors, so
        # over Gloo even when the default backend (NCCL) takes only device tensors.
        self.cpu_group = (
            self.world_group
            if dist.get_backend() == "gloo"
            else dist.new_group(list(range(self.world)), backend="gloo")
        )
        self.ep_group = self.edp_group = None
        for start in range(0, self.world, ep):
            group = dist.new_group(list(range(start, start + ep)))
            if start <= self.rank < start + ep:
                self.ep_group = group
        self.edp_size = self.world // ep
        for offset in range(ep):
            group = dist.new_group(list(range(offset, self.world, ep)))
            if offset == self.ep_rank:
                self.edp_group = group
        self.expert_params = expert_params  # name -> global num_experts

    def __deepcopy__(self, memo) -> ParallelState:
        return self  # holds process group handles, shared by copies of the model

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # -- batches and gradients -------------------------------------------------------------

    def shard_batch(self, batch: Any) -> Any:
        """This rank's rows of a global batch: every tensor split along dim 0 in W parts."""
        if isinstance(batch, Tensor):
            if batch.dim() == 0:
                return batch
            if batch.shape[0] % self.world:
                raise ValueError(
                    f"a batch of {batch.shape[0]} rows cannot be split evenly over {self.world} "
                    f"processes; make batch_size a multiple of {self.world}"
                )
            return batch.chunk(self.world)[self.rank]
        if isinstance(batch, Mapping):
            return type(batch)({k: self.shard_batch(v) for k, v in batch.items()})
        if isinstance(batch, tuple) and hasattr(batch, "_fields"):
            return type(batch)(*(self.shard_batch(v) for v in batch))
        if isinstance(batch, tuple | list):
            return type(batch)(self.shard_batch(v) for v in batch)
        return batch

    def _experts(self, model: nn.Module) -> list[tuple[str, nn.Parameter]]:
        params = dict(unwrap(model).named_parameters())
        return [(name, params[name]) for name in sorted(self.expert_params)]

    @torch.no_grad()
    def finish_backward(self, model: nn.Module) -> None:
        """Expert gradients: summed over the expert-data-parallel group, divided by W.

        After backward an expert's gradient holds the contributions of every rank of its
        EP group (the all-to-all brought them); DDP has already averaged the rest.
        """
        for _, p in self._experts(model):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.edp_size > 1:
                dist.all_reduce(p.grad, group=self.edp_group)
            p.grad.div_(self.world)

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, params: list[Tensor], max_norm: float) -> Tensor:
        """``clip_grad_norm_`` with the norm of the whole (unsharded) gradient."""
        experts = {id(p) for _, p in self._experts(model)}
        grads = [p.grad for p in params if p.grad is not None and id(p) not in experts]
        shard = [p.grad for p in params if p.grad is not None and id(p) in experts]
        squares = []
        device = params[0].device if params else torch.device("cpu")
        for group in (grads, shard):
            norm = torch.nn.utils.get_total_norm(group) if group else torch.zeros((), device=device)
            squares.append(norm.double().square())
        if self.ep > 1:
            dist.all_reduce(squares[1], group=self.ep_group)
        total = (squares[0] + squares[1]).sqrt().float()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    @torch.no_grad()
    def before_optimizer_step(self, model: nn.Module) -> None:
        """Sum the aux-loss-free routers' token counts over all ranks: each rank then moves
        its (replicated) bias by the same, global, sign rule."""
        for router in biased_routers(unwrap(model)):
            dist.all_reduce(router.tokens_seen, group=self.world_group)

    def mean(self, values: list[float]) -> list[float]:
        """The mean of each value over all ranks (for logged losses)."""
        return (
            self.sum_over_ranks(torch.tensor(values, dtype=torch.float64)) / self.world
        ).tolist()

    def agree(self, code: int) -> int:
        """The largest ``code`` over all ranks, so every rank stops at the same step."""
        t = torch.tensor([code], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(t)

    def barrier(self) -> None:
        dist.barrier(group=self.cpu_group)

    def sum_over_ranks(self, values: Tensor) -> Tensor:
        """``values`` (a CPU tensor) summed over all ranks, in place; returned for chaining
        (e.g. ``RoutingMonitor.reduce(state.sum_over_ranks)`` before telemetry is written)."""
        dist.all_reduce(values, group=self.cpu_group)
        return values

    # -- expert banks ------------------------------------------------------------------------

    def gather_experts(self, tensor: Tensor) -> Tensor:
        """This rank's expert shard [E/ep, ...] -> the whole bank [E, ...], on every rank of
        the expert-parallel group (a checkpoint's save gathers banks this way)."""
        parts = [torch.empty_like(tensor) for _ in range(self.ep)]
        dist.all_gather(parts, tensor.contiguous(), group=self.ep_group)
        return torch.cat(parts)


def _shard_bank(bank: nn.Module, num_experts: int, ep: int, ep_rank: int, where: str) -> list[str]:
    """Replace the bank's [E, ...] parameters by this rank's [E/ep, ...] slice."""
    per = num_experts // ep
    names = []
    for name, p in list(bank.named_parameters(recurse=False)):
        if p.dim() >= 1 and p.shape[0] == num_experts:
            piece = p.detach()[ep_rank * per : (ep_rank + 1) * per].clone()
            setattr(bank, name, nn.Parameter(piece, requires_grad=p.requires_grad))
            names.append(name)
    if not callable(getattr(bank, "weights", None)) or len(names) < 2:
        raise TypeError(
            f"{where}: expert parallelism needs an expert bank with [E, ...] parameters and "
            f"weights() (gatelab.experts.ExpertBank); got {type(bank).__name__}"
        )
    if hasattr(bank, "num_experts"):
        bank.num_experts = per
    bank.weights().check()
    return names


def parallelize(
    model: nn.Module,
    ep: int | None = None,
    data_parallel: bool = True,
    local: str | None = None,
    *,
    mesh=None,
    reshard_after_forward: bool = True,
    mp_policy=None,
    global_routing: bool = False,
) -> nn.Module:
    """Expert parallelism for the MoE layers, data parallelism for the rest; see the module
    docstring. Call on every rank after ``torch.distributed.init_process_group``.

    With ``mesh`` (``"dp_shard=2,ep=2"``, a :class:`~gatelab.parallel.mesh.MeshSpec` or a
    built :class:`~gatelab.parallel.mesh.MeshLayout`): FSDP2 with expert parallelism on a
    device mesh instead of DDP (:mod:`gatelab.parallel.fsdp`); ``ep`` and ``data_parallel``
    must then be left out, ``reshard_after_forward`` and ``mp_policy`` go to
    ``fully_shard``. ``global_routing``: capacity and expert choice decide on the global
    batch instead of each rank's tokens (:mod:`gatelab.parallel.decisions`).

    Args:
        model: a model with gatelab ``MoE`` layers (or none: then data parallelism only).
        ep: the expert-parallel size, a divisor of the world size and of every MoE layer's
            num_experts (None: the world size; 1: experts replicated, data parallel only).
        data_parallel: wrap in DistributedDataParallel (False: the caller syncs gradients).
        local: the dispatcher each rank runs on its experts (None: the layer's own).

    Returns the model to train (a DDP wrapper when ``data_parallel``); ``unwrap`` gives the
    module itself, whose ``state_dict`` names are those of the single-device model.
    """
    from ..layers import MoE

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "parallelize needs torch.distributed: launch with torchrun and call "
            "gatelab.parallel.init_distributed() (or init_process_group) first"
        )
    if parallel_state(model) is not None:
        raise ValueError("this model is already parallelized")
    if mesh is not None:
        if ep is not None or not data_parallel:
            raise ValueError(
                "parallelize: give either mesh=... or ep=/data_parallel=, not both; "
                "put the expert-parallel size in the mesh ('dp_shard=2,ep=2')"
            )
        from .fsdp import parallelize_mesh

        return parallelize_mesh(
            model, mesh, reshard_after_forward, mp_policy, local, global_routing
        )
    world = dist.get_world_size()
    ep = world if ep is None else ep
    if not isinstance(ep, int) or ep < 1 or world % ep:
        raise ValueError(f"ep={ep!r} must be a positive divisor of the world size {world}")
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    for name, moe in layers.items():
        if moe.num_experts % ep:
            raise ValueError(
                f"MoE layer {name!r} has num_experts={moe.num_experts}, not divisible by "
                f"ep={ep}; choose ep among the divisors of {moe.num_experts}"
            )
    with torch.no_grad():  # one starting point on every rank, experts included
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    expert_params: dict[str, int] = {}
    for name, moe in layers.items() if ep > 1 else ():
        for param in _shard_bank(moe.experts, moe.num_experts, ep, dist.get_rank() % ep, name):
            expert_params[f"{name}.experts.{param}".lstrip(".")] = moe.num_experts
    state = ParallelState(ep, expert_params)
    for moe in layers.values():
        if ep > 1:
            moe.dispatcher = ExpertParallel(state.ep_group, local or _local_name(moe.dispatcher))
        if world > 1 and moe.loss_weights:
            moe.aux_loss_routing = GlobalRouting(state.world_group)
    setattr(model, _STATE_ATTR, state)
    if global_routing and world > 1:
        from .decisions import make_decisions_global

        make_decisions_global(model, state.world_group)
    if not data_parallel or world == 1:
        return model
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, list(expert_params)
    )
    # No buffer broadcast in forward: routers' token counts are per rank until summed.
    return nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False)


def _local_name(dispatcher: Any) -> str:
    if isinstance(dispatcher, ExpertParallel):
        return dispatcher.local_name
    return dispatcher if isinstance(dispatcher, str) else "grouped"
