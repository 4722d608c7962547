"""The one-layer transformer and the fact acquisition / extraction experiment."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from gatelab.experiments.one_layer_facts import answer_metrics, make_facts
from gatelab.models.one_layer import OneLayerTransformer


@pytest.mark.parametrize("mlp", [True, False])
def test_shapes_and_gradients(mlp):
    model = OneLayerTransformer(20, dim=8, num_heads=2, mlp=mlp, max_seq_len=5)
    logits = model(torch.randint(0, 20, (3, 5)))
    assert logits.shape == (3, 5, 20)
    logits.square().sum().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert (model.mlp is None) != mlp


def test_causal():
    model = OneLayerTransformer(10, dim=8, max_seq_len=4)
    ids = torch.randint(0, 10, (2, 4))
    changed = ids.clone()
    changed[:, 3] = (ids[:, 3] + 1) % 10
    torch.testing.assert_close(model(ids)[:, :3], model(changed)[:, :3])


def test_facts_layout():
    facts = make_facts(6, 3, 4, seed=0)
    seqs = facts.sequences(torch.tensor([2, 5]), question=False)
    assert seqs.shape == (6, 3)
    assert seqs[:, 0].tolist() == [2, 2, 2, 5, 5, 5]
    assert seqs[:3, 1].tolist() == [6, 7, 8]
    questions = facts.sequences(torch.tensor([2]), question=True)
    assert questions[:, 1].tolist() == [9, 10, 11]
    assert torch.equal(questions[:, 2], seqs[:3, 2])  # same answers, other relation tokens
    assert int(seqs[:, 2].min()) >= 12 and int(seqs[:, 2].max()) < facts.vocab_size


def test_answers_are_uniform_over_the_shared_pool():
    facts = make_facts(4000, 2, 8, seed=1)
    counts = torch.bincount(facts.answer.flatten(), minlength=8).float()
    assert (counts / counts.sum() - 1 / 8).abs().max() < 0.01


def test_mlp_model_memorises_a_small_table():
    """Acquisition at toy scale: the model with MLP fits 64 pair facts exactly."""
    facts = make_facts(16, 4, 8, seed=0)
    seqs = facts.sequences(torch.arange(16), question=False)
    model = OneLayerTransformer(facts.vocab_size, dim=32, max_seq_len=3)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(model(seqs[:, :2])[:, 1], seqs[:, 2])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert answer_metrics(model, seqs)[1] == 1.0


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="num_heads"):
        OneLayerTransformer(10, dim=6, num_heads=4)
    with pytest.raises(ValueError, match="act"):
        OneLayerTransformer(10, act="tanh")
    with pytest.raises(ValueError, match="max_seq_len"):
        OneLayerTransformer(10, max_seq_len=2)(torch.zeros(1, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="vocab_size"):
        OneLayerTransformer(10)(torch.full((1, 2), 10))
    with pytest.raises(ValueError, match="num_answers"):
        make_facts(4, 2, 0)


def test_one_layer_facts_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("one-layer-facts").run("smoke", seed=0, out_dir=tmp_path)
    json.dumps(result, allow_nan=False)  # the CLI writes result.json this way
    assert "attention only" in result["table"]
    for runs in result["results"].values():
        assert 0.0 <= runs[0]["finetune"]["0.5"]["heldout_acc"] <= 1.0
