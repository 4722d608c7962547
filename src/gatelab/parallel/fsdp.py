"""``parallelize(model, mesh=...)``: FSDP2 (``fully_shard``) with expert parallelism.

The composition torchtitan uses for MoE models (``models/llama4/infra/parallelize.py``),
on the mesh of :mod:`gatelab.parallel.mesh`:

1. rank 0's parameters and buffers are broadcast, so every rank starts from one model;
2. with ``ep > 1`` each MoE layer's expert bank keeps its ``E/ep`` experts of this EP rank
   and the layer dispatches through :class:`~gatelab.dispatch.ExpertParallel` on the mesh's
   EP group (as ``parallelize(ep=...)`` does);
3. each bank is ``fully_shard``-ed on the expert mesh (``dp_shard``, with ``dp_replicate``
   HSDP), its gradient divided by the whole data-parallel size (every rank of the mesh
   reads different rows; torchtitan sets the same factor on its experts);
4. each block (every child of the model's top-level ``ModuleList``s) and then the root are
   ``fully_shard``-ed on the data-parallel mesh (``dp_shard * ep``, HSDP with replicas).

**Departure (expert banks).** gatelab's dispatchers read a bank's tensors through
``bank.weights()`` instead of calling the bank's ``forward``; ``weights`` is registered as
the bank's FSDP forward (``register_fsdp_forward_method``), so it gathers the bank's
shards, and the bank is not resharded after forward (the dispatcher runs after
``weights()`` returns, and backward reads the same tensors). An expert slice therefore
stays gathered over ``dp_shard`` from its layer's forward to the end of backward (ZeRO-2
for experts); with ``dp_shard = 1`` there is nothing to gather. With ``ep = 1`` the banks
are part of their block's FSDP unit and follow ``reshard_after_forward``.

Gradients: FSDP2 reduce-scatters (and all-reduces over ``dp_replicate``) with the mean
over the data-parallel ranks, so each rank's loss being the mean over its rows makes the
step equal to one process on the full batch; expert gradients already hold the
contributions of the whole EP group (the all-to-all's backward), so their factor is the
whole world size, not the expert mesh's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..dispatch.expert_parallel import ExpertParallel
from . import GlobalRouting, ParallelState, _local_name, _shard_bank, unwrap
from .mesh import MeshLayout, MeshSpec, build_mesh

__all__ = ["MeshState", "parallelize_mesh"]


def _full(tensor: Tensor) -> Tensor:
    """A DTensor's whole value (a collective), a plain tensor as it is."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


class MeshState(ParallelState):
    """:class:`ParallelState` of a model parallelized on a mesh: gradients are synced by
    FSDP2, so :meth:`finish_backward` has nothing to do, and the clipping norm reads
    sharded (DTensor) gradients. ``layout`` holds the meshes. The trainer writes its
    checkpoints with DCP, each rank its shards (:mod:`gatelab.train.dcp`)."""

    sharded_checkpoints = True

    def __init__(self, layout: MeshLayout, expert_params: dict[str, int]):
        super().__init__(layout.spec.ep, expert_params)
        self.layout = layout
        self.ep_group = layout.ep_group  # the mesh's EP group (same ranks as the parent's)

    @property
    def spec(self) -> MeshSpec:
        return self.layout.spec

    def finish_backward(self, model: nn.Module) -> None:
        """Nothing: FSDP2 reduced every gradient (experts over the expert mesh, the rest
        over the data-parallel mesh) at the end of backward."""

    @torch.no_grad()
    def clip_grad_norm_(self, model: nn.Module, params: list[Tensor], max_norm: float) -> Tensor:
        """``clip_grad_norm_`` with the norm of the whole gradient: each group's sharded
        norm made whole, expert slices' squares summed over the EP group."""
        experts = {id(p) for _, p in self._experts(model)}
        squares = []
        for mine in (False, True):
            grads = [p.grad for p in params if p.grad is not None and (id(p) in experts) == mine]
            norm = _full(torch.nn.utils.get_total_norm(grads)) if grads else torch.zeros(())
            squares.append(norm.double().square().cpu())
        if self.ep > 1:
            dist.all_reduce(squares[1], group=self.cpu_group_ep)
        total = (squares[0] + squares[1]).sqrt().float()
        coef = float((max_norm / (total + 1e-6)).clamp(max=1.0))
        for p in params:
            if p.grad is not None:
                p.grad.mul_(coef)
        return total

    @property
    def cpu_group_ep(self):
        """A Gloo group over this rank's EP group, for CPU scalars under NCCL."""
        if not hasattr(self, "_cpu_group_ep"):
            self._cpu_group_ep = self._cpu_subgroups()
        return self._cpu_group_ep

    def _cpu_subgroups(self):
        if dist.get_backend() == "gloo":
            return self.ep_group
        mine = None
        for start in range(0, self.world, self.ep):
            group = dist.new_group(list(range(start, start + self.ep)), backend="gloo")
            mine = group if start <= self.rank < start + self.ep else mine
        return mine

    def gather_experts(self, tensor: Tensor) -> Tensor:
        """This rank's (sharded) expert slice -> the whole bank [E, ...]."""
        return super().gather_experts(_full(tensor))


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP units below the root: the children of every top-level ``ModuleList`` (a
    transformer's blocks), or, without one, every MoE layer."""
    from ..layers import MoE

    units, lists = [], []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and not any(name.startswith(p) for p in lists):
            lists.append(name + ".")
            units.extend(module)
    if not units:
        units = [m for m in model.modules() if isinstance(m, MoE) and m is not model]
    return units


def _expert_placement(per_rank: int, dp_shard: int):
    """FSDP2's placement of an EP slice [E/ep, ...] over ``dp_shard`` ranks: dim 0 when the
    slice's experts divide evenly, else dim 1 when that divides (no padding; torchtitan
    does the same when ``dp_shard * ep > E``), else dim 0 padded."""
    from torch.distributed.tensor import Shard

    def place(param):
        if per_rank % dp_shard and param.dim() > 1 and param.shape[1] % dp_shard == 0:
            return Shard(1)
        return None

    return place


def _mixed_precision(policy):
    """An FSDP2 ``MixedPrecisionPolicy`` from ``policy``: None (fp32: parameters and
    reductions in the parameters' dtype), "bf16" (bf16 parameters in forward and backward
    and bf16 gradient reductions; the sharded fp32 parameters stay the master copy the
    optimizer steps) or a policy as it is. bf16 needs CUDA: on CPU runs stay fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if policy is None or isinstance(policy, MixedPrecisionPolicy):
        return policy or MixedPrecisionPolicy()
    if policy != "bf16":
        raise ValueError(f"mixed precision {policy!r}: use 'bf16' or a MixedPrecisionPolicy")
    if dist.get_backend() != "nccl":
        raise ValueError(
            "mixed precision 'bf16' needs GPUs (NCCL); on CPU (Gloo) train in fp32: leave "
            "the mixed precision out"
        )
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)


def parallelize_mesh(
    model: nn.Module,
    mesh,
    reshard_after_forward: bool = True,
    mp_policy=None,
    local: str | None = None,
    global_routing: bool = False,
) -> nn.Module:
    """See the module docstring; called by ``gatelab.parallelize(model, mesh=...)``.

    ``mesh``: a spec string (``"dp_shard=2,ep=2"``), a :class:`MeshSpec` or a
    :class:`MeshLayout` from :func:`build_mesh`. ``mp_policy``: "bf16", an FSDP2
    ``MixedPrecisionPolicy`` or None (fp32), see :func:`_mixed_precision`.
    """
    from torch.distributed.fsdp import (
        fully_shard,
        register_fsdp_forward_method,
    )

    from ..layers import MoE

    mp_policy = _mixed_precision(mp_policy)
    layers = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
    layout = mesh if isinstance(mesh, MeshLayout) else None
    if layout is None:
        world = dist.get_world_size()
        spec = MeshSpec.parse(mesh, world) if isinstance(mesh, str) else mesh
        spec.resolve(world).check(world, {n: m.num_experts for n, m in layers.items()})
        layout = build_mesh(spec)
    spec = layout.spec.check(dist.get_world_size(), {n: m.num_experts for n, m in layers.items()})
    with torch.no_grad():  # one starting point on every rank, experts included
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)
    ep_rank = layout.mesh.get_local_rank("ep")
    expert_params: dict[str, int] = {}
    for name, moe in layers.items() if spec.ep > 1 else ():
        for param in _shard_bank(moe.experts, moe.num_experts, spec.ep, ep_rank, name):
            expert_params[f"{name}.experts.{param}".lstrip(".")] = moe.num_experts
    state = MeshState(layout, expert_params)
    for moe in layers.values():
        if spec.ep > 1:
            moe.dispatcher = ExpertParallel(state.ep_group, local or _local_name(moe.dispatcher))
        if spec.world > 1 and moe.loss_weights:
            moe.aux_loss_routing = GlobalRouting(state.world_group)
    if global_routing and spec.world > 1:
        from .decisions import make_decisions_global

        make_decisions_global(model, state.world_group)
    for moe in layers.values() if spec.ep > 1 else ():
        fully_shard(
            moe.experts,
            mesh=layout.expert_mesh,
            reshard_after_forward=False,
            mp_policy=mp_policy,
            shard_placement_fn=_expert_placement(moe.num_experts // spec.ep, spec.dp_shard),
        )
        register_fsdp_forward_method(moe.experts, "weights")
        moe.experts.set_gradient_divide_factor(float(spec.world))
        # Gloo has no PREMUL_SUM: sum, then divide. Not with one shard: torch 2.13 then
        # divides twice (by the factor in place of the reduce-scatter, and again after).
        if dist.get_backend() == "gloo" and layout.spec.dp_shard > 1:
            moe.experts.set_force_sum_reduction_for_comms(True)
    for block in _blocks(model):
        fully_shard(
            block,
            mesh=layout.dp_mesh,
            reshard_after_forward=reshard_after_forward,
            mp_policy=mp_policy,
        )
    # The root's parameters (embeddings, final norm) are needed again right after forward
    # by backward: torchtitan keeps them gathered (reshard_after_forward=False) too.
    fully_shard(model, mesh=layout.dp_mesh, reshard_after_forward=False, mp_policy=mp_policy)
    unwrap(model)._gatelab_parallel = state
    return model
