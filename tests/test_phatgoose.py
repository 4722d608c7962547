"""PHATGOOSE (arXiv 2402.05859): gates, post-hoc router, routed LoRA experts; digit transforms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gatelab.adapt.lora import LoRALinear, add_lora
from gatelab.adapt.phatgoose import (
    GatedLoRALinear,
    PhatGooseLinear,
    PhatGooseRouter,
    gated_modules,
    phatgoose_model,
    set_mode,
    standardize,
    train_gates,
    train_lora_expert,
)
from gatelab.data.transforms import DIGIT_TRANSFORMS, transform_images
from gatelab.routing import ROUTERS


def mlp():
    return nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))


def task_data(seed, n=64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def gated_expert(base, seed, steps=5, gate_steps=5):
    x, y = task_data(seed)
    expert = train_lora_expert(base, ["0", "2"], x, y, rank=2, steps=steps, seed=seed)
    return train_gates(expert, x, y, steps=gate_steps, lr=0.05, seed=seed)


def test_router_is_registered_and_matches_the_formula():
    assert ROUTERS.get("phatgoose") is PhatGooseRouter
    router = PhatGooseRouter(dim=5, num_experts=3, top_k=2)
    gates = torch.randn(3, 5)
    router.load_gates(gates)
    x = torch.randn(7, 5)

    def z(v):
        return (v - v.mean(-1, keepdim=True)) / torch.sqrt(
            v.var(-1, unbiased=False, keepdim=True) + 1e-5
        )

    want = z(x) @ z(gates).t() / math.sqrt(5)
    routing = router(x)
    torch.testing.assert_close(routing.logits, want)
    torch.testing.assert_close(routing.weights.sum(-1), torch.ones(7))
    top2 = want.softmax(-1).topk(2, dim=-1)
    assert torch.equal(routing.experts, top2.indices)
    torch.testing.assert_close(routing.weights, top2.values / top2.values.sum(-1, keepdim=True))
    assert not router.weight.requires_grad


def test_router_picks_the_expert_whose_gate_matches_the_token():
    # gates are distinct patterns; a token that is a (scaled, shifted, noisy) copy of gate e
    # must go to e first: standardisation removes the scale and the shift.
    gen = torch.Generator().manual_seed(1)
    gates = torch.randn(4, 16, generator=gen)
    router = PhatGooseRouter(16, 4, top_k=2).load_gates(gates)
    which = torch.tensor([2, 0, 3, 1, 2])
    tokens = 5.0 * gates[which] + 3.0 + 0.1 * torch.randn(5, 16, generator=gen)
    assert torch.equal(router(tokens).experts[:, 0], which)


def test_router_bad_configuration():
    with pytest.raises(ValueError, match="top_k=3 exceeds num_experts=2"):
        PhatGooseRouter(4, 2, top_k=3)
    with pytest.raises(ValueError, match=r"gates must be \[num_experts, dim\] = \[2, 4\]"):
        PhatGooseRouter(4, 2, top_k=1).load_gates(torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"router input must be \[T, 4\]"):
        PhatGooseRouter(4, 2, top_k=1)(torch.zeros(2, 5))


def test_gate_scales_the_lora_input_only():
    lora = LoRALinear(nn.Linear(4, 3), rank=2)
    with torch.no_grad():
        lora.lora_B.normal_()
    gated = GatedLoRALinear(lora)
    x = torch.randn(6, 4)
    # v = 0: sigmoid(0) = 1/2 halves the LoRA input, and the LoRA is linear
    torch.testing.assert_close(gated(x), lora.base(x) + 0.5 * lora.delta(x))
    with torch.no_grad():
        gated.gate.copy_(torch.tensor([1.0, -2.0, 0.5, 0.0]))
    g = torch.sigmoid(x @ gated.gate)
    torch.testing.assert_close(gated(x), lora.base(x) + g[:, None] * lora.delta(x))


def test_train_gates_trains_only_the_gates():
    torch.manual_seed(0)
    base = mlp()
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    x, y = task_data(0)
    expert = train_lora_expert(base, ["0", "2"], x, y, rank=2, steps=10)
    for key, value in base.state_dict().items():  # the shared base is not touched
        assert torch.equal(value, base_state[key])
    lora_state = {k: v.clone() for k, v in expert.state_dict().items()}
    train_gates(expert, x, y, steps=10, lr=0.05)
    gates = gated_modules(expert)
    assert sorted(gates) == ["0", "2"]
    assert all(g.gate.abs().sum() > 0 for g in gates.values())  # the gates moved
    state = expert.state_dict()
    for key, value in lora_state.items():  # base and LoRA factors bit-identical
        assert torch.equal(state[key.replace(".", ".lora.", 1)], value), key
    assert [n for n, p in expert.named_parameters() if p.requires_grad] == ["0.gate", "2.gate"]


def test_gradients_reach_the_gate():
    gated = GatedLoRALinear(LoRALinear(nn.Linear(4, 3), rank=2))
    with torch.no_grad():
        gated.lora.lora_B.normal_()
    gated(torch.randn(5, 4)).square().sum().backward()
    assert gated.gate.grad is not None and gated.gate.grad.abs().sum() > 0
    assert gated.lora.lora_A.grad is None and gated.lora.base.weight.grad is None


def test_modes_match_references():
    torch.manual_seed(0)
    base = nn.Linear(5, 4)
    loras = []
    for rank in (1, 3):  # different ranks are zero-padded
        layer = LoRALinear(nn.Linear(5, 4), rank=rank, alpha=2.0)
        layer.base = base
        with torch.no_grad():
            layer.lora_B.normal_()
        loras.append(layer)
    gates = torch.randn(2, 5)
    mixed = PhatGooseLinear(
        base,
        [m.lora_A for m in loras],
        [m.lora_B for m in loras],
        [m.scaling for m in loras],
        gates,
        top_k=1,
    )
    x = torch.randn(3, 7, 5)  # any leading shape
    for e, layer in enumerate(loras):
        mixed.set_mode(e)
        torch.testing.assert_close(mixed(x), layer(x))
    mixed.set_mode("uniform")
    mean_dw = (loras[0].delta_weight() + loras[1].delta_weight()) / 2
    torch.testing.assert_close(mixed(x), base(x) + x @ mean_dw.t())
    mixed.set_mode("route")
    out = mixed(x)
    chosen = mixed.last_routing.experts[:, 0]  # top-1: weight 1 on the chosen expert
    flat = x.reshape(-1, 5)
    want = torch.stack([loras[int(e)](flat[t]) for t, e in enumerate(chosen)])
    torch.testing.assert_close(out.reshape(-1, 4), want)
    with pytest.raises(ValueError, match="mode must be one of"):
        mixed.set_mode(2)
    with pytest.raises(ValueError, match=r"expects inputs \[..., 5\]"):
        mixed(torch.randn(2, 4))


def test_top2_routing_combines_two_experts_with_renormalised_weights():
    torch.manual_seed(0)
    base = mlp()
    experts = [gated_expert(base, s) for s in range(3)]
    model = phatgoose_model(base, experts, top_k=2)
    layer = model[0]
    x = torch.randn(5, 6)
    out = layer(x)
    routing = layer.last_routing
    deltas = layer.expert_deltas(x)
    want = base[0](x) + sum(
        routing.weights[:, k, None] * deltas[torch.arange(5), routing.experts[:, k]]
        for k in range(2)
    )
    torch.testing.assert_close(out, want)
    assert model(torch.randn(4, 6)).shape == (4, 3)
    assert not any(p.requires_grad for p in model.parameters())


def test_phatgoose_model_bad_configurations():
    base = mlp()
    with pytest.raises(ValueError, match="experts is empty"):
        phatgoose_model(base, [])
    x, y = task_data(0)
    other = train_lora_expert(base, ["0"], x, y, rank=2, steps=2)
    train_gates(other, x, y, steps=2)
    with pytest.raises(ValueError, match="adapt the same layers"):
        phatgoose_model(base, [gated_expert(base, 1, 2, 2), other])
    no_gates = mlp()
    add_lora(no_gates, "0", rank=2)
    with pytest.raises(ValueError, match="has no gated LoRA layers"):
        phatgoose_model(base, [no_gates])
    with pytest.raises(ValueError, match="has no LoRALinear layers"):
        train_gates(mlp(), x, y)
    with pytest.raises(ValueError, match="no PhatGooseLinear layers"):
        set_mode(mlp(), "route")


def test_digit_transforms():
    x = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(transform_images(x, "rot90+rot90+rot90+rot90"), x)
    torch.testing.assert_close(transform_images(x, "rot90+rot180"), transform_images(x, "rot270"))
    torch.testing.assert_close(
        transform_images(x, "transpose"), transform_images(x, "rot90+flip_ud")
    )
    torch.testing.assert_close(transform_images(x, "invert"), 1 - x)
    assert torch.equal(transform_images(x, "shift")[..., 0, :], torch.zeros(3, 1, 8))
    noisy = transform_images(x, "noise", seed=3)
    assert torch.equal(noisy, transform_images(x, "noise", seed=3))
    assert not torch.equal(noisy, transform_images(x, "noise", seed=4))
    assert noisy.min() >= 0 and noisy.max() <= 1
    for name in DIGIT_TRANSFORMS:
        assert transform_images(x, name).shape == x.shape
    with pytest.raises(ValueError, match="unknown transformation 'spin'"):
        transform_images(x, "rot90+spin")
    with pytest.raises(ValueError, match="needs square images"):
        transform_images(torch.rand(2, 4, 5), "rot90")
    with pytest.raises(ValueError, match="float"):
        transform_images(torch.zeros(2, 4, 4, dtype=torch.int64), "identity")


def test_standardize_is_layer_norm_without_affine():
    x = torch.randn(4, 9) * 3 + 2
    z = standardize(x)
    torch.testing.assert_close(z.mean(-1), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(4), atol=1e-3, rtol=0)


def test_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("phatgoose").run("smoke", seed=0, out_dir=tmp_path)
    assert "PHATGOOSE top-2" in result["table"]
    held_out = result["runs"][0]["held_out"]
    assert set(held_out) == {"rot90+noise", "rot270", "transpose", "invert+noise", "shift"}
    for row in held_out.values():
        for arm in ("base", "uniform", "phatgoose", "oracle"):
            assert 0 <= row[arm] <= 1
        assert len(row["top1_expert_per_layer"]) == 3
    for row in result["runs"][0]["held_in"].values():
        assert all(0 <= share <= 1 for share in row["routed_to_own"])


def test_table_labels_break_ties_by_seed_order():
    """The most-routed / oracle label of a table cell: the majority over the seeds; a tie
    goes to the label of the earliest seed and says so (not to set iteration order)."""
    from gatelab.experiments.phatgoose import _common

    assert _common(["rot90", "invert", "rot90"]) == "rot90"
    assert _common(["invert", "rot90", "rot90", "invert"]) == "invert (tie)"
    assert _common(["rot90", "invert", "invert", "rot90"]) == "rot90 (tie)"
    assert _common(["flip_ud", "invert", "rot90"]) == "flip_ud (tie)"
