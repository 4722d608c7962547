"""Sharded data: each data-parallel rank reads only its own rows of every batch.

Under ``gatelab.parallelize`` the global batch of B rows is split over W ranks, rank r
training on rows ``[r B/W, (r+1) B/W)``. Without sharded data every rank builds the whole
batch and keeps its slice (``ParallelState.shard_batch``). :class:`ShardedBatches` wraps
an iterator that can cut the batch before reading it (``next_shard(rank, world)``:
:class:`~gatelab.data.LMBatches`, :class:`~gatelab.data.TensorBatches`), so a rank reads
(gathers, tokenises, decodes) only its B/W rows: the same rows as before, by construction.

State: every rank's iterator moves by the whole batch, so the position in its
``state_dict`` is the global one, the same on every rank; the shard ``(rank, world)`` is
stored beside it and ignored on load. A run saved by W ranks therefore resumes on any
other number of ranks (or one process) at the same batch.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

__all__ = ["ShardedBatches", "shard_data", "shard_rows"]


def shard_rows(rows: Tensor, rank: int, world: int) -> Tensor:
    """Rows ``[rank B/W, (rank+1) B/W)`` of a batch's B row indices (B divisible by W)."""
    if len(rows) % world:
        raise ValueError(
            f"a batch of {len(rows)} rows cannot be split evenly over {world} processes; "
            f"make batch_size a multiple of {world}"
        )
    per = len(rows) // world
    return rows[rank * per : (rank + 1) * per]


class ShardedBatches:
    """This rank's rows of every batch of ``source`` (an iterator with ``next_shard``)."""

    sharded = True  # the trainer reads this: the batches are already this rank's rows

    def __init__(self, source: Any, rank: int, world: int):
        if not callable(getattr(source, "next_shard", None)):
            raise TypeError(
                f"{type(source).__name__} cannot read a shard of a batch (no next_shard); "
                "leave it unwrapped and let ParallelState.shard_batch cut the global batch"
            )
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not in [0, world={world})")
        batch_size = getattr(source, "batch_size", None)
        if batch_size is not None and batch_size % world:
            raise ValueError(
                f"batch_size={batch_size} cannot be split evenly over {world} processes; "
                f"make batch_size a multiple of {world}"
            )
        self.source, self.rank, self.world = source, rank, world

    def __iter__(self) -> ShardedBatches:
        return self

    def __next__(self):
        return self.source.next_shard(self.rank, self.world)

    def state_dict(self) -> dict:
        return {**self.source.state_dict(), "shard": [self.rank, self.world]}

    def load_state_dict(self, state: dict) -> None:
        """The global position of ``state``, saved under any number of ranks."""
        self.source.load_state_dict({k: v for k, v in state.items() if k != "shard"})

    def __getattr__(self, name: str):
        if name == "source":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)  # batch_size, seq_len, ... of the source


def shard_data(data: Any, rank: int, world: int) -> Any:
    """``data`` as :class:`ShardedBatches` when it can read a shard (and W > 1), else as it
    is (the trainer then cuts the global batch)."""
    if world > 1 and callable(getattr(data, "next_shard", None)):
        return ShardedBatches(data, rank, world)
    return data
