"""LoRA (arXiv 2106.09685): zero start, merge, frozen base, targets and bad configurations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from gatelab.adapt.lora import (
    LoRALinear,
    add_lora,
    find_linear_targets,
    lora_modules,
    lora_parameters,
    merge_lora,
)


def mlp(dim=6, hidden=10, out=3, bias=True):
    return nn.Sequential(
        nn.Linear(dim, hidden, bias=bias), nn.ReLU(), nn.Linear(hidden, out, bias=bias)
    )


def train(model, params, steps=20, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, model[0].in_features, generator=gen)
    y = torch.randint(0, 3, (32,), generator=gen)
    opt = torch.optim.SGD(params, lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def test_starts_equal_to_the_base_and_has_the_paper_shapes():
    model = mlp()
    x = torch.randn(5, 6)
    before = model(x)
    names = add_lora(model, ["0", "2"], rank=2, alpha=4)
    assert names == ["0", "2"]
    layer = model[0]
    assert isinstance(layer, LoRALinear)
    assert layer.lora_A.shape == (2, 6) and layer.lora_B.shape == (10, 2)
    assert layer.scaling == 2.0
    assert torch.equal(layer.lora_B, torch.zeros(10, 2))
    torch.testing.assert_close(model(x), before)


def test_delta_is_scaled_low_rank_update():
    layer = LoRALinear(nn.Linear(4, 5), rank=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(7, 4)
    want = layer.base(x) + 3.0 * x @ (layer.lora_B @ layer.lora_A).t()
    torch.testing.assert_close(layer(x), want)
    assert torch.linalg.matrix_rank(layer.delta_weight()) <= 2


@pytest.mark.parametrize("bias", [True, False])
def test_merged_equals_unmerged_after_training(bias):
    model = mlp(bias=bias)
    add_lora(model, ["0", "2"], rank=3, alpha=5)
    train(model, lora_parameters(model))
    x = torch.randn(9, 6)
    unmerged = model(x).detach()
    assert lora_modules(model)
    merge_lora(model)
    assert not lora_modules(model)
    assert type(model[0]) is nn.Linear and type(model[2]) is nn.Linear
    torch.testing.assert_close(model(x), unmerged, atol=1e-6, rtol=1e-5)


def test_base_stays_bit_identical_and_only_adapters_get_gradients():
    model = mlp()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    add_lora(model, "0", rank=2)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 2 and {id(p) for p in trainable} == {
        id(p) for p in lora_parameters(model)
    }
    # train every parameter the optimizer is given: frozen ones must not move
    train(model, list(model.parameters()), steps=30)
    assert model[0].lora_B.abs().sum() > 0  # the adapter did learn
    state = model.state_dict()
    for key, value in base.items():
        new_key = key.replace("0.", "0.base.", 1) if key.startswith("0.") else key
        assert torch.equal(state[new_key], value), key


def test_freeze_false_keeps_other_parameters_trainable():
    model = mlp()
    add_lora(model, "0", rank=2, freeze=False)
    assert model[2].weight.requires_grad
    assert not model[0].base.weight.requires_grad


def test_targets_by_suffix_and_pattern():
    model = nn.Module()
    model.blocks = nn.ModuleList([nn.ModuleDict({"fc1": nn.Linear(4, 4)}) for _ in range(2)])
    model.head = nn.Linear(4, 2)
    assert find_linear_targets(model, "fc1") == ["blocks.0.fc1", "blocks.1.fc1"]
    assert find_linear_targets(model, "blocks.*.fc1") == ["blocks.0.fc1", "blocks.1.fc1"]
    add_lora(model, "*", rank=1)
    # modules inside an adapter are not targets again
    assert sorted(lora_modules(model)) == ["blocks.0.fc1", "blocks.1.fc1", "head"]
    with pytest.raises(ValueError, match="matches no nn.Linear"):
        add_lora(model, "head", rank=1)


@pytest.mark.parametrize("rank", [0, -1, 2.0, True, 7])
def test_bad_rank_errors(rank):
    model = mlp(dim=6, hidden=10, out=6)
    with pytest.raises(ValueError, match="rank"):
        add_lora(model, ["0", "2"], rank=rank)
    assert not lora_modules(model)  # nothing was changed


def test_other_bad_configurations():
    with pytest.raises(ValueError, match="target 'nope'"):
        add_lora(mlp(), "nope", rank=1)
    with pytest.raises(ValueError, match=r"matches no nn.Linear in the model \(it matches: ReLU\)"):
        add_lora(mlp(), "1", rank=1)
    with pytest.raises(ValueError, match="targets is empty"):
        add_lora(mlp(), [], rank=1)
    with pytest.raises(ValueError, match="alpha"):
        LoRALinear(nn.Linear(4, 4), rank=1, alpha=0)
    with pytest.raises(ValueError, match="dropout"):
        LoRALinear(nn.Linear(4, 4), rank=1, dropout=1.0)
    with pytest.raises(TypeError, match="nn.Linear"):
        LoRALinear(nn.Conv1d(4, 4, 1), rank=1)
    with pytest.raises(ValueError, match=r"inputs \[..., 4\]"):
        LoRALinear(nn.Linear(4, 4), rank=1)(torch.randn(2, 5))


def test_dropout_only_in_training():
    layer = LoRALinear(nn.Linear(8, 8), rank=2, dropout=0.5)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 8)
    layer.eval()
    torch.testing.assert_close(layer(x), layer(x))
    torch.testing.assert_close(layer(x), layer.merged()(x), atol=1e-6, rtol=1e-5)
