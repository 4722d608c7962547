"""Expert parallelism: experts sharded over a process group, tokens moved by all-to-all.

The scheme of GShard ("GShard: Scaling Giant Models with Conditional Computation and
Automatic Sharding", arXiv 2006.16668) as MegaBlocks, DeepSpeed-MoE and torchtitan run
it, on ``torch.distributed`` (NCCL on GPUs, Gloo on CPUs) and nothing else:

1. each rank sorts its routed slots by expert; experts ``[r * E/W, (r + 1) * E/W)`` live
   on rank r of the W ranks, so the sorted rows are already grouped by destination;
2. ``all_to_all_single`` of the per-expert slot counts (E int64 per rank), so every rank
   knows how many rows it will receive from each source for each of its experts;
3. ``all_to_all_single`` of the token rows (uneven splits), run through the *local*
   dispatcher (grouped by default) on the rank's E/W experts, sent back by a second
   ``all_to_all_single`` with the splits reversed;
4. the source rank multiplies each returned row by its routing weight and sums it into
   its token (the combine of :mod:`gatelab.dispatch.grouped`).

Departures from MegaBlocks/DeepSpeed: routing weights never travel, they are applied at
the source after the return exchange (their gradient stays local; the rows that travel
are unweighted expert outputs), and the counts go per expert rather than per rank so the
receiver can label rows with their local expert without a second exchange. Dropless: no
capacity padding is sent (MegaBlocks dMoE, torchtitan). Gloo in torch 2.13 implements
``all_to_all_single`` with uneven splits on CPU, so one code path serves both backends.

Both exchanges are autograd Functions whose backward is the reverse exchange, so
gradients reach the source's tokens and the owner's expert weights. Every rank calls
every collective on every forward and backward, including ranks with no tokens and
experts that receive none (zero-length splits), so nothing waits on a rank that skipped
(DeepSpeed#1392, #2870).

``ExpertParallel.counters`` counts the bytes each exchange moves to other ranks (rows
kept on the same rank are a local copy and counted apart): the numbers
``docs/distributed.md`` checks its traffic formula against.
"""

from __future__ import annotations

import math
import time

import torch
import torch.distributed as dist
from torch import Tensor

from ..experts.bank import ExpertWeights
from .checks import check_dispatch_inputs
from .grouped import combine, compact_slots, sort_slots

COUNTER_KEYS = (
    "calls",
    "count_bytes",  # per-expert counts sent to other ranks (forward only)
    "forward_bytes",  # token rows + returned outputs sent to other ranks in forward
    "backward_bytes",  # their gradients sent to other ranks in backward
    "local_bytes",  # rows a rank routes to its own experts (copied, not sent)
    "remote_rows",  # routed slots whose expert lives on another rank (forward)
    "routed_rows",  # all routed slots (forward)
    "exchange_s",  # wall time inside the token all-to-alls (blocking on Gloo; on NCCL only
    # the launch, the collective runs asynchronously on its stream)
)


def layer_bytes(sent_rows: int, received_rows: int, dim: int, element_size: int) -> dict:
    """Bytes one rank sends to other ranks for one MoE layer, forward and backward.

    ``sent_rows``: routed slots of this rank's tokens whose expert lives on another rank;
    ``received_rows``: slots of other ranks' tokens routed to this rank's experts. Forward
    sends the first as token rows and returns the second as expert outputs; backward
    sends the gradients of both the other way:
    forward = backward = (sent + received) * dim * element_size.
    With T tokens per rank, top-k, W ranks and balanced routing, sent = received =
    k * T * (W - 1) / W, so one training step moves 4 k T D s (W - 1) / W bytes out of each
    rank per layer, plus the counts, 8 E (W - 1) / W bytes per forward.
    """
    per_pass = (sent_rows + received_rows) * dim * element_size
    return {"forward_bytes": per_pass, "backward_bytes": per_pass}


def _remote_elements(splits: list[int], rank: int) -> int:
    return sum(splits) - splits[rank]


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` of rows [N, D] with uneven splits; backward is the reverse."""

    @staticmethod
    def forward(ctx, x, out_splits, in_splits, owner, phase):
        ctx.splits, ctx.owner, ctx.phase = (out_splits, in_splits), owner, phase
        return owner.exchange(x, out_splits, in_splits, phase)

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        # Double backward is linear too: apply the Function again with the splits swapped.
        back = _AllToAll.apply(grad.contiguous(), in_splits, out_splits, ctx.owner, "backward")
        return back, None, None, None, None


class ExpertParallel:
    """A dispatcher object for ``MoE(dispatcher=...)`` that runs its experts on W ranks.

    Call signature as every dispatcher: ``(x [T, D], experts [T, K], weights [T, K],
    bank, deterministic) -> [T, D]``, where ``experts`` holds *global* ids in [0, E) and
    ``bank`` the E/W experts of this rank (``gatelab.parallelize`` shards the bank).

    Args:
        group: the expert-parallel process group (None: the default group).
        local: the dispatcher run on the rank's own experts ("grouped", "loop", "auto").

    ``counters`` (a dict of ints, keys in ``COUNTER_KEYS``) accumulates until
    :meth:`reset_counters`.
    """

    def __init__(self, group: dist.ProcessGroup | None = None, local: str = "grouped"):
        from . import get_dispatcher

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ExpertParallel needs an initialised torch.distributed process group: launch "
                "with torchrun and call torch.distributed.init_process_group first"
            )
        if isinstance(local, ExpertParallel) or not isinstance(local, str):
            raise TypeError(f"local must be a dispatcher name, got {local!r}")
        self.local_name = local
        self.local = get_dispatcher(local)
        self.group = group
        self.rank = dist.get_rank(group)
        self.size = dist.get_world_size(group)
        self.reset_counters()

    def __repr__(self) -> str:
        return f"ExpertParallel(rank={self.rank}, size={self.size}, local={self.local_name!r})"

    def __deepcopy__(self, memo) -> ExpertParallel:
        # A process group is a handle of this process: a copied model (EMA, averaging)
        # shares it, and the counters with it.
        return self

    def reset_counters(self) -> None:
        self.counters = dict.fromkeys(COUNTER_KEYS, 0)
        self.counters["exchange_s"] = 0.0

    def exchange(self, x: Tensor, out_splits: list[int], in_splits: list[int], phase: str):
        """One uneven ``all_to_all_single`` of rows; counts the bytes that leave the rank."""
        row_bytes = math.prod(x.shape[1:]) * x.element_size()  # x may have no rows
        self.counters[f"{phase}_bytes"] += _remote_elements(in_splits, self.rank) * row_bytes
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        start = time.perf_counter()
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=self.group)
        self.counters["exchange_s"] += time.perf_counter() - start
        return out

    def local_experts(self, num_experts: int) -> tuple[int, int]:
        """[start, stop) of the global expert ids this rank holds."""
        per_rank = self._per_rank(num_experts)
        return self.rank * per_rank, (self.rank + 1) * per_rank

    def _per_rank(self, num_experts: int) -> int:
        if num_experts % self.size:
            raise ValueError(
                f"num_experts={num_experts} is not divisible by the expert-parallel size "
                f"{self.size}; choose an ep size that divides the number of experts"
            )
        return num_experts // self.size

    def __call__(
        self,
        x: Tensor,
        experts: Tensor,
        weights: Tensor,
        bank: ExpertWeights,
        deterministic: bool = True,
    ) -> Tensor:
        size, local_count = self.size, bank.num_experts
        num_experts = local_count * size
        check_dispatch_inputs(x, experts, weights, bank, num_experts)  # global ids
        slots, tokens, _, counts, _ = compact_slots(sort_slots(experts, num_experts))
        send = counts.view(size, local_count).sum(dim=1).tolist()
        recv_counts = torch.empty_like(counts)
        # First the counts, so every receiver can size its buffers and label its rows.
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_by_expert = recv_counts.view(size, local_count)
        recv = recv_by_expert.sum(dim=1).tolist()
        self._count(counts, send, x)

        rows = x.index_select(0, tokens)  # grouped by destination rank (experts are sorted)
        received = _AllToAll.apply(rows, recv, send, self, "forward")
        local_ids = torch.arange(local_count, device=x.device).repeat(size)
        local_ids = local_ids.repeat_interleave(recv_by_expert.reshape(-1)).unsqueeze(1)
        ones = torch.ones(local_ids.shape, dtype=weights.dtype, device=x.device)
        outputs = self.local(received, local_ids, ones, bank, deterministic)
        returned = _AllToAll.apply(outputs, send, recv, self, "forward")

        slot_weights = weights.reshape(-1)[slots].to(returned.dtype).unsqueeze(1)
        return combine(returned * slot_weights, slots, tokens, tuple(experts.shape), deterministic)

    def _count(self, counts: Tensor, send: list[int], x: Tensor) -> None:
        c = self.counters
        c["calls"] += 1
        c["count_bytes"] += (counts.numel() - counts.numel() // self.size) * counts.element_size()
        c["routed_rows"] += sum(send)
        c["remote_rows"] += _remote_elements(send, self.rank)
        c["local_bytes"] += send[self.rank] * x.shape[1] * x.element_size()
