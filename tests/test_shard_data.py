"""Sharded data: each rank reads only its rows of every batch, the rows it kept before."""

from __future__ import annotations

import pytest
import torch

from gatelab.data import LMBatches, ShardedBatches, TensorBatches, load_corpus, shard_data


@pytest.fixture(scope="module")
def corpus():
    return load_corpus()


def _tensor_batches():
    x = torch.arange(30).float().unsqueeze(1)
    return TensorBatches(x, torch.arange(30), batch_size=8, seed=1)


def _lm_batches(corpus):
    return LMBatches(corpus, "train", seq_len=16, batch_size=8, seed=2)


@pytest.mark.parametrize("kind", ["tensor", "lm"])
@pytest.mark.parametrize("world", [2, 4, 8])
def test_shards_are_the_rows_of_the_global_batch(corpus, kind, world):
    """Over 5 batches (crossing an epoch for TensorBatches), rank r's shard is rows
    [r B/W, (r+1) B/W) of the batch one process reads, and every rank's position is the
    global one."""
    make = _tensor_batches if kind == "tensor" else lambda: _lm_batches(corpus)
    whole = make()
    ranks = [ShardedBatches(make(), r, world) for r in range(world)]
    for _ in range(5):
        batch = next(whole)
        shards = [next(it) for it in ranks]
        for field, parts in zip(batch, zip(*shards, strict=True), strict=True):
            assert torch.equal(torch.cat(parts), field)
        for it in ranks:
            state = it.state_dict()
            assert state.pop("shard") == [it.rank, world]
            assert state == whole.state_dict()


def test_resume_on_another_number_of_ranks(corpus):
    """A 2-rank state resumes 4 ranks (and one process) at the same global batch."""
    two = [ShardedBatches(_lm_batches(corpus), r, 2) for r in range(2)]
    for _ in range(3):
        [next(it) for it in two]
    whole = _lm_batches(corpus)
    whole.load_state_dict(two[0].state_dict())
    four = [ShardedBatches(_lm_batches(corpus), r, 4) for r in range(4)]
    for it in four:
        it.load_state_dict(two[1].state_dict())
    batch = next(whole)
    assert torch.equal(torch.cat([next(it).inputs for it in four]), batch.inputs)


def test_sharding_errors_and_fallback():
    with pytest.raises(ValueError, match="batch_size=8 cannot be split evenly over 3"):
        ShardedBatches(_tensor_batches(), 0, 3)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        ShardedBatches(_tensor_batches(), 2, 2)
    with pytest.raises(TypeError, match="no next_shard"):
        ShardedBatches(iter([1, 2]), 0, 2)
    plain = iter([1, 2])
    assert shard_data(plain, 0, 2) is plain  # the trainer cuts the global batch then
    assert isinstance(shard_data(_tensor_batches(), 1, 2), ShardedBatches)
    assert not isinstance(shard_data(_tensor_batches(), 0, 1), ShardedBatches)
