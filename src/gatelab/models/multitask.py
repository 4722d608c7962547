"""Multi-task experts: shared-bottom, MMoE, PLE/CGC and HoME, with the statistics HoME names.

Every model maps x [N, dim] to one prediction per task, [N, num_tasks], through per-task
towers. Each records, on every forward, the outputs of its expert groups and the weights
of its gates, so :func:`expert_statistics` can report what HoME calls

- **expert collapse**: the share of zero activations of each expert (ReLU experts whose
  outputs are mostly exactly zero), and
- **expert degradation**: for each shared expert, the share of its gate weight that comes
  from each task (a shared expert taken over by one task has a share near 1 for it).

Experts are one-hidden-layer networks ``act(norm(x W + b))`` of width ``expert_dim``
(the MMoE paper's synthetic setting uses single-layer ReLU experts); a group of E experts
is one [E, D, F] weight, run as one batched product. Towers are
``Linear(expert_dim, tower_dim) -> ReLU -> Linear(tower_dim, 1)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..layers._checks import check_positive

__all__ = [
    "CGC",
    "HoME",
    "MMoE",
    "MULTITASK_MODELS",
    "PLE",
    "ExpertGroup",
    "FeatureGate",
    "MultiTaskModel",
    "SharedBottom",
    "expert_statistics",
]


class ExpertGroup(nn.Module):
    """E one-layer experts: x [N, D] (or private inputs [N, E, D]) -> [N, E, expert_dim].

    ``act``: "relu" (MMoE, PLE) or "silu" (HoME's Swish). ``norm=True`` puts a BatchNorm
    on each expert's pre-activation (HoME's expert normalisation): one BatchNorm1d over
    the E * F channels, which normalises every expert's every unit on its own, as E
    separate BatchNorms would.
    """

    def __init__(
        self, num_experts: int, dim: int, expert_dim: int, act: str = "relu", norm: bool = False
    ):
        super().__init__()
        check_positive("ExpertGroup", num_experts=num_experts, dim=dim, expert_dim=expert_dim)
        if act not in ("relu", "silu"):
            raise ValueError(f"ExpertGroup: act must be 'relu' or 'silu', got {act!r}")
        self.num_experts, self.dim, self.expert_dim, self.act = num_experts, dim, expert_dim, act
        bound = 1 / math.sqrt(dim)  # nn.Linear's default init, per expert
        self.weight = nn.Parameter(
            torch.empty(num_experts, dim, expert_dim).uniform_(-bound, bound)
        )
        self.bias = nn.Parameter(torch.empty(num_experts, expert_dim).uniform_(-bound, bound))
        self.norm = nn.BatchNorm1d(num_experts * expert_dim) if norm else None

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 2:
            h = torch.einsum("nd,edf->nef", x, self.weight)
        else:
            h = torch.einsum("ned,edf->nef", x, self.weight)
        h = h + self.bias
        if self.norm is not None:
            h = self.norm(h.flatten(1)).view_as(h)
        return F.relu(h) if self.act == "relu" else F.silu(h)


class FeatureGate(nn.Module):
    """HoME's feature gate: a private input per expert, ``2 * sigmoid(v A_e B_e) * v``.

    "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou" (arXiv
    2408.05430). A_e [D, rank] and B_e [rank, D] are LoRA-style factors, one pair per
    expert. Choices where the paper is open: ``rank`` defaults to 2 (the value of a
    third-party implementation, unconfirmed), and B starts at zero as in LoRA, so every
    gate starts at exactly 2 * sigmoid(0) = 1 (the identity) and the private inputs
    separate only as training asks.
    """

    def __init__(self, num_experts: int, dim: int, rank: int = 2):
        super().__init__()
        check_positive("FeatureGate", num_experts=num_experts, dim=dim, rank=rank)
        self.a = nn.Parameter(torch.randn(num_experts, dim, rank) / math.sqrt(dim))
        self.b = nn.Parameter(torch.zeros(num_experts, rank, dim))

    def forward(self, v: Tensor) -> Tensor:
        """v [N, D] -> private inputs [N, E, D]."""
        low = torch.einsum("nd,edr->ner", v, self.a)
        gate = 2 * torch.sigmoid(torch.einsum("ner,erd->ned", low, self.b))
        return gate * v[:, None, :]


def _tower(expert_dim: int, tower_dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(expert_dim, tower_dim), nn.ReLU(), nn.Linear(tower_dim, 1))


class MultiTaskModel(nn.Module):
    """Base: input checks, towers, and the record of expert outputs and gate weights.

    After each forward, ``last_experts`` maps an expert-group name to its outputs
    [N, E, F] and ``last_gates`` maps a task index to (expert names, weights [N, n]) for
    the gate that feeds that task's tower (or, in HoME, its task layer). ``shared`` lists
    the names of the experts every task can reach (the ones degradation is about).
    """

    def __init__(self, dim: int, num_tasks: int, expert_dim: int, tower_dim: int):
        super().__init__()
        check_positive(
            type(self).__name__,
            dim=dim,
            num_tasks=num_tasks,
            expert_dim=expert_dim,
            tower_dim=tower_dim,
        )
        self.dim, self.num_tasks = dim, num_tasks
        self.towers = nn.ModuleList(_tower(expert_dim, tower_dim) for _ in range(num_tasks))
        self.last_experts: dict[str, Tensor] = {}
        self.last_gates: dict[int, tuple[list[str], Tensor]] = {}
        self.shared: list[str] = []

    def _check(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 2 or x.shape[1] != self.dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(
                f"{type(self).__name__} expects x [batch, dim={self.dim}], got {shape}"
            )

    def _heads(self, reps: list[Tensor]) -> Tensor:
        return torch.cat([tower(r) for tower, r in zip(self.towers, reps, strict=True)], dim=1)

    def _record(self, name: str, out: Tensor) -> Tensor:
        self.last_experts[name] = out.detach()
        return out


def _names(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(count)]


def _mix(gate: nn.Linear, gate_input: Tensor, experts: Tensor) -> tuple[Tensor, Tensor]:
    """softmax gate over the experts [N, n, F] -> (mixture [N, F], weights [N, n])."""
    weights = gate(gate_input).softmax(-1)
    return torch.einsum("nk,nkf->nf", weights, experts), weights


class SharedBottom(MultiTaskModel):
    """The shared-bottom baseline: one ``Linear -> ReLU`` bottom feeds every task's tower
    (Caruana, "Multitask Learning", 1997; the baseline of the MMoE paper)."""

    def __init__(self, dim: int, num_tasks: int = 2, hidden_dim: int = 64, tower_dim: int = 8):
        super().__init__(dim, num_tasks, hidden_dim, tower_dim)
        self.bottom = ExpertGroup(1, dim, hidden_dim, "relu")

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        h = self._record("bottom", self.bottom(x))[:, 0]
        return self._heads([h] * self.num_tasks)


class MMoE(MultiTaskModel):
    """Multi-gate mixture of experts: tower_k(sum_i softmax(W_k x)_i f_i(x)).

    "Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts"
    (Ma et al., KDD 2018). All experts are shared; each task has its own softmax gate, a
    linear map of the input, as in the paper.
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int = 2,
        num_experts: int = 8,
        expert_dim: int = 16,
        tower_dim: int = 8,
    ):
        super().__init__(dim, num_tasks, expert_dim, tower_dim)
        check_positive("MMoE", num_experts=num_experts)
        self.experts = ExpertGroup(num_experts, dim, expert_dim, "relu")
        self.gates = nn.ModuleList(nn.Linear(dim, num_experts) for _ in range(num_tasks))
        self.shared = _names("shared", num_experts)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        experts = self._record("shared", self.experts(x))
        reps = []
        for t, gate in enumerate(self.gates):
            rep, w = _mix(gate, x, experts)
            self.last_gates[t] = (self.shared, w.detach())
            reps.append(rep)
        return self._heads(reps)


class PLE(MultiTaskModel):
    """Progressive Layered Extraction; with ``num_levels=1`` it is CGC.

    "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for
    Personalized Recommendations" (Tang et al., RecSys 2020). Each level has
    ``num_specific`` experts per task and ``num_shared`` shared experts; task k's gate is a
    softmax over its own and the shared experts (Customized Gate Control). Below the last
    level a shared gate over all experts gives the shared experts' next input, and each
    task's gate output its specific experts' next input. Gates read their level's input
    for that task (the raw input at level 1), as in the paper.
    """

    def __init__(
        self,
        dim: int,
        num_tasks: int = 2,
        num_shared: int = 4,
        num_specific: int = 2,
        expert_dim: int = 16,
        tower_dim: int = 8,
        num_levels: int = 1,
    ):
        super().__init__(dim, num_tasks, expert_dim, tower_dim)
        check_positive(
            "PLE", num_shared=num_shared, num_specific=num_specific, num_levels=num_levels
        )
        self.num_levels = num_levels
        self.levels = nn.ModuleList()
        for level in range(num_levels):
            width = dim if level == 0 else expert_dim
            last = level == num_levels - 1
            mods = nn.ModuleDict(
                {
                    "shared": ExpertGroup(num_shared, width, expert_dim),
                    "specific": nn.ModuleList(
                        ExpertGroup(num_specific, width, expert_dim) for _ in range(num_tasks)
                    ),
                    "gates": nn.ModuleList(
                        nn.Linear(width, num_specific + num_shared) for _ in range(num_tasks)
                    ),
                }
            )
            if not last:
                mods["shared_gate"] = nn.Linear(width, num_tasks * num_specific + num_shared)
            self.levels.append(mods)
        self.num_specific, self.num_shared_experts = num_specific, num_shared
        self.shared = _names(f"L{num_levels - 1}.shared", num_shared)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        task_in, shared_in = [x] * self.num_tasks, x
        for level, mods in enumerate(self.levels):
            tag = f"L{level}."
            shared = self._record(tag + "shared", mods["shared"](shared_in))
            specific = [
                self._record(f"{tag}task{t}.", group(task_in[t]))
                for t, group in enumerate(mods["specific"])
            ]
            shared_names = _names(tag + "shared", shared.shape[1])
            outs = []
            for t, gate in enumerate(mods["gates"]):
                pool = torch.cat([specific[t], shared], dim=1)
                rep, w = _mix(gate, task_in[t], pool)
                self.last_gates[t] = (
                    _names(f"{tag}task{t}.", self.num_specific) + shared_names,
                    w.detach(),
                )
                outs.append(rep)
            if "shared_gate" in mods:
                shared_in, _ = _mix(
                    mods["shared_gate"], shared_in, torch.cat([*specific, shared], 1)
                )
            task_in = outs
        return self._heads(task_in)


class CGC(PLE):
    """Customized Gate Control: single-level PLE (Tang et al., RecSys 2020)."""

    def __init__(
        self,
        dim: int,
        num_tasks: int = 2,
        num_shared: int = 4,
        num_specific: int = 2,
        expert_dim: int = 16,
        tower_dim: int = 8,
    ):
        super().__init__(dim, num_tasks, num_shared, num_specific, expert_dim, tower_dim, 1)


class HoME(MultiTaskModel):
    """Hierarchy of Multi-Gate Experts.

    "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou" (Wang et
    al., arXiv 2408.05430, KDD 2025). Its four parts, and our reading where the paper (which
    we could not read in full, and which has no official code) leaves a choice open:

    1. **Expert normalisation and Swish**: every expert is ``Linear -> BatchNorm -> Swish``
       (``ExpertGroup(norm=True, act="silu")``), so experts' outputs share one scale and
       no unit is dead at zero.
    2. **Hierarchy mask**: tasks fall into ``task_groups`` (a list of task-index lists).
       Level 1 (meta) has ``num_shared`` shared meta-experts and ``num_group`` meta-experts
       per group; group g's meta gate sees only the shared and group-g meta experts and
       gives meta_g, and a shared meta gate over all meta experts gives meta_shared.
       Level 2 (task) has ``num_shared`` shared experts reading meta_shared and
       ``num_specific`` experts per task reading meta of its group; task t's gate sees only
       the level-2 shared experts and its own. Our choice: level 2 has no group experts
       (the group split is carried by level 1), and gates read the raw input x.
    3. **Feature gate**: every level-1 expert reads a private input
       ``2 * sigmoid(x A_e B_e) * x`` (:class:`FeatureGate`, rank ``gate_rank``).
       Our choice: level-2 experts read the meta outputs without a feature gate, since
       those are already specific to a group.
    4. **Self-gate**: the notes give no formula. Our reading of "a residual-style gate so
       gradients reach the deep layers": task t's representation is
       ``sum_i g_t,i e_i + sigmoid(W_t m + b_t) * m`` with m = meta of t's group, a gated
       residual from level 1 to the tower (``self_gate=False`` drops it).

    The statistics: ``shared`` lists the level-2 shared experts (the ones all task gates
    see); ``last_gates`` holds the task gates of level 2.
    """

    def __init__(
        self,
        dim: int,
        task_groups: list[list[int]] | None = None,
        num_shared: int = 2,
        num_group: int = 2,
        num_specific: int = 2,
        expert_dim: int = 16,
        tower_dim: int = 8,
        gate_rank: int = 2,
        self_gate: bool = True,
    ):
        groups = [[0], [1]] if task_groups is None else [list(g) for g in task_groups]
        num_tasks = sum(len(g) for g in groups)
        if (
            not groups
            or any(not g for g in groups)
            or sorted(sum(groups, [])) != list(range(num_tasks))
        ):
            raise ValueError(
                "HoME: task_groups must split the tasks 0..T-1 into non-empty groups, each "
                f"task in exactly one, e.g. [[0, 1], [2]]; got {task_groups!r}"
            )
        super().__init__(dim, num_tasks, expert_dim, tower_dim)
        check_positive(
            "HoME",
            num_shared=num_shared,
            num_group=num_group,
            num_specific=num_specific,
            gate_rank=gate_rank,
        )
        self.task_groups = groups
        self.group_of = {t: g for g, tasks in enumerate(groups) for t in tasks}
        num_meta = num_shared + num_group * len(groups)
        self.feature_gate = FeatureGate(num_meta, dim, gate_rank)
        self.meta = ExpertGroup(num_meta, dim, expert_dim, "silu", norm=True)
        self.meta_gates = nn.ModuleList(nn.Linear(dim, num_shared + num_group) for _ in groups)
        self.meta_shared_gate = nn.Linear(dim, num_meta)
        self.task_shared = ExpertGroup(num_shared, expert_dim, expert_dim, "silu", norm=True)
        self.task_specific = nn.ModuleList(
            ExpertGroup(num_specific, expert_dim, expert_dim, "silu", norm=True)
            for _ in range(num_tasks)
        )
        self.task_gates = nn.ModuleList(
            nn.Linear(dim, num_shared + num_specific) for _ in range(num_tasks)
        )
        self.self_gates = (
            nn.ModuleList(nn.Linear(expert_dim, expert_dim) for _ in range(num_tasks))
            if self_gate
            else None
        )
        self.num_shared_experts, self.num_group, self.num_specific = (
            num_shared,
            num_group,
            num_specific,
        )
        self.shared = _names("task.shared", num_shared)

    def forward(self, x: Tensor) -> Tensor:
        self._check(x)
        meta = self._record("meta", self.meta(self.feature_gate(x)))  # [N, M, F]
        s = self.num_shared_experts
        meta_out = []
        for g, gate in enumerate(self.meta_gates):
            visible = torch.cat(
                [meta[:, :s], meta[:, s + g * self.num_group : s + (g + 1) * self.num_group]], 1
            )
            meta_out.append(_mix(gate, x, visible)[0])
        meta_shared, _ = _mix(self.meta_shared_gate, x, meta)
        shared = self._record("task.shared", self.task_shared(meta_shared))
        reps = []
        for t in range(self.num_tasks):
            m = meta_out[self.group_of[t]]
            own = self._record(f"task{t}.", self.task_specific[t](m))
            rep, w = _mix(self.task_gates[t], x, torch.cat([shared, own], 1))
            self.last_gates[t] = (self.shared + _names(f"task{t}.", self.num_specific), w.detach())
            if self.self_gates is not None:
                rep = rep + torch.sigmoid(self.self_gates[t](m)) * m
            reps.append(rep)
        return self._heads(reps)


MULTITASK_MODELS = {
    "shared_bottom": SharedBottom,
    "mmoe": MMoE,
    "cgc": CGC,
    "ple": PLE,
    "home": HoME,
}


@torch.no_grad()
def expert_statistics(model: MultiTaskModel) -> dict:
    """HoME's collapse and degradation statistics from the model's last forward.

    ``zero_share``: expert name -> share of its output units that are exactly zero over
    the batch (dead ReLU units; a Swish output is zero only at exactly 0, so HoME's experts
    score ~0 by construction, which is the point of the change).
    ``scale``: expert name -> mean |output|, to compare output scales across experts.
    ``task_share``: shared expert name -> the share of its summed gate weight that comes
    from each task (a list over tasks; 1/T each when balanced, near 1 for one task when
    that task has taken it over). Empty for a model without gates.
    """
    if not model.last_experts:
        raise RuntimeError("expert_statistics needs a forward pass of the model first")
    zero, scale = {}, {}
    for group, out in model.last_experts.items():
        names = [group] if out.shape[1] == 1 else _names(group, out.shape[1])
        for e, name in enumerate(names):
            zero[name] = float((out[:, e] == 0).float().mean())
            scale[name] = float(out[:, e].abs().mean())
    mass = torch.zeros(model.num_tasks, len(model.shared))
    for t, (names, weights) in model.last_gates.items():
        for j, name in enumerate(model.shared):
            if name in names:
                mass[t, j] = weights[:, names.index(name)].sum()
    total = mass.sum(0).clamp_min(1e-12)
    task_share = (
        {name: (mass[:, j] / total[j]).tolist() for j, name in enumerate(model.shared)}
        if model.last_gates
        else {}
    )
    return {"zero_share": zero, "scale": scale, "task_share": task_share}
