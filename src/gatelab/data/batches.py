"""Resumable, shuffled minibatches over in-memory tensors (digits, MNIST, CIFAR...)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from .shard import shard_rows


class TensorBatches:
    """Endless shuffled minibatches of rows of equally long tensors, e.g. (images, labels).

    The order of epoch ``e`` comes from ``(seed, e)`` alone and the position is
    ``(epoch, index)``, so ``load_state_dict(state_dict())`` continues with exactly the
    batches an uninterrupted iterator would have given (the trainer's resume relies on it).
    """

    def __init__(self, *tensors: Tensor, batch_size: int, seed: int = 0, shuffle: bool = True):
        if not tensors or any(t.shape[0] != tensors[0].shape[0] for t in tensors):
            raise ValueError("TensorBatches needs tensors with the same number of rows")
        if tensors[0].shape[0] == 0:
            raise ValueError("TensorBatches needs at least one row")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.batch_size = tensors, batch_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch = self.index = 0

    def _order(self, epoch: int) -> Tensor:
        rows = self.tensors[0].shape[0]
        if not self.shuffle:
            return torch.arange(rows)
        return torch.randperm(
            rows, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        )

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        return self

    def __next__(self) -> tuple[Tensor, ...]:
        return tuple(t[rows] for rows in [self._take()] for t in self.tensors)

    def next_shard(self, rank: int, world: int) -> tuple[Tensor, ...]:
        """Rows ``[rank B/W, (rank+1) B/W)`` of the next batch; the position moves by the
        whole batch (:class:`~gatelab.data.ShardedBatches`)."""
        rows = shard_rows(self._take(), rank, world)
        return tuple(t[rows] for t in self.tensors)

    def _take(self) -> Tensor:
        """The next batch's row indices; moves the position."""
        parts, need = [], self.batch_size
        while need:
            order = self._order(self.epoch)
            take = order[self.index : self.index + need]
            parts.append(take)
            need -= len(take)
            self.index += len(take)
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts)

    def state_dict(self) -> dict:
        return {
            "rows": int(self.tensors[0].shape[0]),
            "seed": self.seed,
            "epoch": self.epoch,
            "index": self.index,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("rows", "seed"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(
                    f"cannot resume: saved {key}={state.get(key)!r} but these batches have "
                    f"{key}={self.state_dict()[key]!r} (a different dataset or seed)"
                )
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
