"""The device mesh of a sharded run: named dimensions, parsed from ``"dp_shard=2,ep=2"``.

Three dimensions, outermost first (every one of them is data parallel: each rank of the
mesh reads its own rows of the batch):

- ``dp_replicate``: HSDP's replicas. Parameters are replicated across it and gradients
  all-reduced (the slow, inter-node dimension: put it outermost, across nodes).
- ``dp_shard``: FSDP2's shard dimension. Non-expert parameters are fully sharded over
  ``dp_shard * ep`` ranks; expert banks over ``dp_shard`` ranks.
- ``ep``: expert parallelism. Each expert bank is cut into ``ep`` slices of ``E/ep``
  experts; tokens travel by all-to-all (innermost: consecutive ranks, one node).

World size = ``dp_replicate * dp_shard * ep``. torchtitan spells the same layout with ``ep``
borrowed from its ``dp_shard``: its ``dp_shard`` is our ``dp_shard * ep`` and its
``dp_shard_mod_ep`` (the experts' FSDP dimension, "efsdp") is our ``dp_shard``. We keep
``ep`` as a dimension of its own so a spec names each factor once and the world size is
their product; the groups are the same.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

__all__ = ["DIMS", "MeshLayout", "MeshSpec", "build_mesh"]

DIMS = ("dp_replicate", "dp_shard", "ep")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
    """Sizes of the three mesh dimensions (see the module docstring)."""

    dp_replicate: int = 1
    dp_shard: int = 1
    ep: int = 1

    @classmethod
    def parse(cls, text: str, world: int | None = None) -> MeshSpec:
        """``"dp_shard=2,ep=2"`` -> MeshSpec. One size may be -1: the world size divided by
        the others (``world`` is then needed). Unnamed dimensions are 1."""
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"mesh {text!r}: expected NAME=SIZE pairs such as 'dp_shard=2,ep=2'")
        sizes: dict[str, int] = {}
        for item in text.split(","):
            name, eq, value = (part.strip() for part in item.partition("="))
            if name not in DIMS:
                raise ValueError(
                    f"mesh {text!r}: unknown dimension {name!r}; use {', '.join(DIMS)}"
                )
            if not eq or not value.lstrip("-").isdigit() or int(value) == 0 or int(value) < -1:
                raise ValueError(
                    f"mesh {text!r}: {name} needs a positive size (or -1 for the rest), "
                    f"got {value!r}"
                )
            if name in sizes:
                raise ValueError(f"mesh {text!r}: {name} is given twice")
            sizes[name] = int(value)
        return cls(**sizes).resolve(world) if -1 in sizes.values() else cls(**sizes)

    def resolve(self, world: int | None) -> MeshSpec:
        """Fill the one -1 size from the world size."""
        sizes = dataclasses.asdict(self)
        free = [name for name, size in sizes.items() if size == -1]
        if len(free) > 1:
            raise ValueError(f"mesh {self.text()}: only one dimension may be -1")
        if not free:
            return self
        if world is None:
            raise ValueError(f"mesh {self.text()}: -1 needs the world size")
        rest = self.dp_replicate * self.dp_shard * self.ep * -1
        if world % rest:
            raise ValueError(f"mesh {self.text()}: {world} processes do not divide by {rest}")
        return dataclasses.replace(self, **{free[0]: world // rest})

    @property
    def world(self) -> int:
        return self.dp_replicate * self.dp_shard * self.ep

    def text(self) -> str:
        return ",".join(f"{name}={getattr(self, name)}" for name in DIMS)

    def check(self, world: int, num_experts: dict[str, int] | None = None) -> MeshSpec:
        """The spec against the job: the product of the sizes is the world size, and ``ep``
        divides every MoE layer's ``num_experts`` (``{layer name: num_experts}``)."""
        if self.world != world:
            raise ValueError(
                f"mesh {self.text()} has {self.world} ranks but the job has {world} processes; "
                f"make dp_replicate * dp_shard * ep = {world} (or give one size as -1)"
            )
        for name, experts in (num_experts or {}).items():
            if experts % self.ep:
                raise ValueError(
                    f"mesh {self.text()}: MoE layer {name!r} has num_experts={experts}, not "
                    f"divisible by ep={self.ep}; choose ep among the divisors of {experts}"
                )
        return self


@dataclasses.dataclass
class MeshLayout:
    """The meshes a sharded model is placed on, all over the same ranks.

    ``mesh``: the 3-D mesh (``DIMS``). ``dp_mesh``: what non-expert parameters are fully
    sharded on: 1-D (``dp_shard * ep``) or, with replicas, 2-D HSDP ``(dp_replicate,
    dp_shard_ep)``. ``expert_mesh``: what each rank's expert slice is sharded on:
    ``dp_shard`` (2-D with ``dp_replicate``).
    """

    spec: MeshSpec
    mesh: object
    dp_mesh: object
    expert_mesh: object

    @property
    def ep_group(self):
        return self.mesh.get_group("ep")


def _device_type() -> str:
    return "cuda" if dist.get_backend() == "nccl" and torch.cuda.is_available() else "cpu"


def build_mesh(spec: MeshSpec | str, device_type: str | None = None) -> MeshLayout:
    """The meshes of ``spec`` on the initialised default process group (every rank calls it:
    creating process groups is collective). Rank r sits at ``(r // (S*N), r // N % S, r % N)``,
    so the EP groups are consecutive ranks, as ``parallelize(ep=...)`` makes them."""
    from torch.distributed.device_mesh import init_device_mesh

    world = dist.get_world_size()
    if isinstance(spec, str):
        spec = MeshSpec.parse(spec, world)
    spec = spec.resolve(world).check(world)
    device_type = device_type or _device_type()
    sizes = (spec.dp_replicate, spec.dp_shard, spec.ep)
    mesh = init_device_mesh(device_type, sizes, mesh_dim_names=DIMS)
    # A second mesh over the same ranks with dp_shard and ep merged (public API, where
    # torchtitan uses the private DeviceMesh._flatten).
    if spec.dp_replicate > 1:
        dp_mesh = init_device_mesh(
            device_type,
            (spec.dp_replicate, spec.dp_shard * spec.ep),
            mesh_dim_names=("dp_replicate", "dp_shard_ep"),
        )
        expert_mesh = mesh["dp_replicate", "dp_shard"]
    else:
        dp_mesh = init_device_mesh(device_type, (world,), mesh_dim_names=("dp_shard_ep",))
        expert_mesh = mesh["dp_shard"]
    return MeshLayout(spec, mesh, dp_mesh, expert_mesh)
