"""Pre-gates (gatelab.edit.pregate) and offloaded inference (gatelab.edit.offload)."""

from __future__ import annotations

import pytest
import torch

from gatelab.edit import find_moe_blocks
from gatelab.edit.offload import OffloadedExperts, resident_expert_bytes
from gatelab.edit.pregate import PreGates, pregate_hit_rate, train_pregates
from gatelab.models import LM, LMConfig


def _gatelab_lm(num_layers=3, moe_layers=(0, 1, 2), bias=False):
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=50,
        dim=32,
        num_layers=num_layers,
        num_heads=4,
        max_seq_len=32,
        moe_layers=list(moe_layers),
        num_experts=6,
        top_k=2,
        expert_hidden_dim=24,
    )
    model = LM(config).eval()
    with torch.no_grad():
        for block in find_moe_blocks(model):
            block.router.weight.normal_(0.0, 0.5)
    return model


def _prompts(n=3, seq=16, seed=1, vocab=50):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (2, seq), generator=g) for _ in range(n)]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_pregate_learns_the_next_router():
    model, prompts = _gatelab_lm(), _prompts(n=4)
    blocks = find_moe_blocks(model)
    gates = PreGates({b.layer: 32 for b in blocks}, {b.layer: 6 for b in blocks}, {0: 1, 1: 2})
    with torch.no_grad():
        for p in gates.parameters():
            p.zero_()  # untrained: every expert tied, hit rate at chance
    before = pregate_hit_rate(model, gates, prompts)
    train_pregates(model, prompts, steps=150, lr=3e-2, gates=gates)
    after = pregate_hit_rate(model, gates, prompts)
    for layer, r in after.items():
        assert r["chance"] == pytest.approx(2 / 6)
        assert r["hit_rate"] > r["chance"] + 0.25, (layer, before[layer], r)
    assert gates.predict(0, torch.randn(5, 32), 2).shape == (5, 2)
    held_out = pregate_hit_rate(model, gates, _prompts(seed=7))
    assert all(r["hit_rate"] > r["chance"] for r in held_out.values())


@pytest.mark.parametrize("use_pregates", [False, True])
@pytest.mark.parametrize("capacity", [1, 4, 18])
def test_offloaded_equals_resident_gatelab(tmp_path, use_pregates, capacity):
    model = _gatelab_lm(num_layers=4, moe_layers=(0, 2, 3))
    prompts = _prompts()
    resident = [_logits(model, ids) for ids in prompts]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    full_bytes = resident_expert_bytes(model)
    gates = train_pregates(model, prompts, steps=20) if use_pregates else None
    with OffloadedExperts(model, tmp_path, capacity, pregates=gates) as off:
        assert resident_expert_bytes(model) == 0  # the model's own expert tensors are freed
        for ids, expected in zip(prompts, resident, strict=True):
            assert torch.equal(_logits(model, ids), expected)
        off.wait()
        stats = off.stats
    assert stats.misses > 0 and stats.requests == stats.hits + stats.misses
    per_expert = full_bytes // (3 * 6)
    assert stats.peak_resident_bytes <= max(capacity, 6) * per_expert
    if use_pregates:  # prefetches survive only when the cache has room beside a layer's set
        assert stats.pregate_hit_rate is not None
        assert stats.prefetch_hits > 0 or capacity <= 6
    else:
        assert stats.pregate_hit_rate is None and stats.prefetch_hits == 0
    for k, v in model.state_dict().items():  # restored exactly
        assert torch.equal(v, state[k]), k
    assert torch.equal(_logits(model, prompts[0]), resident[0])


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_offloaded_equals_resident_hf(tmp_path, family):
    pytest.importorskip("transformers")
    import hf_tiny

    model = hf_tiny.build(family, implementation="gatelab")
    ids = hf_tiny.ids()
    expected = _logits(model, ids)
    blocks = find_moe_blocks(model)
    gates = train_pregates(model, [ids], steps=5) if len(blocks) > 1 else None
    with OffloadedExperts(model, tmp_path, 3, pregates=gates) as off:
        assert torch.equal(_logits(model, ids), expected)
    assert off.stats.misses > 0
    assert torch.equal(_logits(model, ids), expected)


def test_bad_input(tmp_path):
    model = _gatelab_lm()
    with pytest.raises(ValueError, match="capacity"):
        OffloadedExperts(model, tmp_path, 0)
    with pytest.raises(ValueError, match="no MoE blocks"):
        OffloadedExperts(torch.nn.Linear(2, 2), tmp_path, 2)
    with pytest.raises(ValueError, match="at least 2 MoE layers"):
        PreGates.for_model(_gatelab_lm(num_layers=2, moe_layers=(1,)))
    with pytest.raises(ValueError, match="empty"):
        train_pregates(model, [])
    gates = PreGates.for_model(model)
    with pytest.raises(KeyError, match="no pre-gate for layer 2"):
        gates(2, torch.randn(1, 32))
