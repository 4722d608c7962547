"""Routing profiles by prompt set and contrastive neuron localisation (gatelab.inspect)."""

from __future__ import annotations

import json

import pytest
import torch

from gatelab.edit.steer import clamp_neurons
from gatelab.inspect.access import capture_routing, find_moe_blocks
from gatelab.inspect.localize import expert_signatures, localize_neurons
from gatelab.inspect.plots import plot_profile
from gatelab.inspect.profile import RoutingProfile, profile_routing
from gatelab.models import LM, LMConfig


def _lm():
    torch.manual_seed(0)
    config = LMConfig(
        vocab_size=50,
        dim=32,
        num_layers=2,
        num_heads=4,
        max_seq_len=16,
        moe_layers="all",
        num_experts=4,
        top_k=2,
        expert_hidden_dim=16,
    )
    model = LM(config).eval()
    with torch.no_grad():
        for block in find_moe_blocks(model):
            block.router.weight.normal_(0.0, 1.0)
    return model


def _prompts(low, high, n=3, seq=8, seed=0):
    return torch.randint(low, high, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_profile_counts_by_hand():
    model = _lm()
    a = _prompts(0, 25)
    b = [_prompts(25, 50, 2, 5), torch.tensor([30, 31, 32])]
    profile = profile_routing(model, {"a": a, "b": b})
    assert profile.prompts == {"a": 3, "b": 3} and profile.tokens == {"a": 24, "b": 13}
    # by hand: per prompt, fraction of its tokens per expert, then the mean over prompts
    expected = torch.zeros(2, 4)
    weight = torch.zeros(2, 4)
    for row in b[0].tolist() + [b[1].tolist()]:
        with capture_routing(model) as cap, torch.no_grad():
            model(torch.tensor([row]))
        for i, layer in enumerate(cap.layers):
            r = cap.routing(layer)
            expected[i] += r.tokens_per_expert().float() / len(row) / 3
            weight[i] += r.dense_weights().sum(0) / len(row) / 3
    torch.testing.assert_close(profile.maps["b"]["frequency"], expected)
    torch.testing.assert_close(profile.maps["b"]["mean_weight"], weight)
    # every token takes top_k slots
    torch.testing.assert_close(profile.maps["a"]["frequency"].sum(1), torch.full((2,), 2.0))
    contrast = profile.contrast("a")
    torch.testing.assert_close(contrast, profile.maps["a"]["frequency"] - expected)
    top = profile.top_experts("a", 3)
    assert len(top) == 3 and top[0][2] == pytest.approx(float(contrast.max()))
    per_layer = profile.top_experts("b", 1, per_layer=True)
    assert [t[0] for t in per_layer] == [0, 1]


def test_profile_json_round_trip_and_heatmap(tmp_path):
    model = _lm()
    profile = profile_routing(model, {"a": _prompts(0, 25), "b": _prompts(25, 50)})
    path = profile.save_json(tmp_path / "profile.json")
    data = json.loads(path.read_text())
    assert data["layers"] == [0, 1] and set(data["contrast"]) == {"a", "b"}
    again = RoutingProfile.from_dict(data)
    torch.testing.assert_close(again.contrast("b"), profile.contrast("b"))
    png = plot_profile(profile, tmp_path / "profile.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_profile_bad_input():
    model = _lm()
    with pytest.raises(ValueError, match="prompt set 'b' is empty"):
        profile_routing(model, {"a": _prompts(0, 5), "b": []})
    with pytest.raises(ValueError, match="longer than the model's context of 16"):
        profile_routing(model, {"a": torch.zeros(1, 17, dtype=torch.long)})
    with pytest.raises(ValueError, match="no tokens"):
        profile_routing(model, {"a": [torch.zeros(0, dtype=torch.long)]})
    with pytest.raises(ValueError, match="at least two prompt sets"):
        profile_routing(model, {"a": _prompts(0, 5)}).contrast("a")
    with pytest.raises(TypeError, match="not text"):
        profile_routing(model, {"a": "some text"})


def test_localize_finds_planted_neurons():
    """Neurons made to fire only for one token range are the ones localised."""
    model = _lm()
    block = find_moe_blocks(model)[0]
    w = block.expert_weights()
    target, other = _prompts(0, 25, n=6, seed=1), _prompts(25, 50, n=6, seed=2)
    # plant: neurons 3 and 7 of expert 1 read the embedding direction of tokens 0..24
    with torch.no_grad():
        direction = model.embed.weight[:25].mean(0) - model.embed.weight[25:].mean(0)
        direction = direction / direction.norm()
        for n in (3, 7):
            w.w_in[1, n] = 30 * direction  # gate row
            w.w_in[1, 16 + n] = 30 * direction  # up row
    experts = {0: [0, 1]}
    report = localize_neurons(model, target, other, experts, threshold=2.0)
    found = {(n["layer"], n["expert"], n["neuron"]) for n in report.neurons}
    assert {(0, 1, 3), (0, 1, 7)} <= found
    assert all(n["z"] > 2.0 for n in report.neurons)
    sigs = expert_signatures(model, target, {0: [1]})
    assert sigs[(0, 1)].shape[1] == 16
    # the list clamps as is
    with clamp_neurons(model, report.neurons):
        assert bool((w.w_out[1, :, 3] == 0).all())
    assert not bool((w.w_out[1, :, 3] == 0).all())


def test_localize_bad_input():
    model = _lm()
    with pytest.raises(ValueError, match="ids in 0..3"):
        localize_neurons(model, _prompts(0, 5), _prompts(5, 9), {0: [4]})
    with pytest.raises(ValueError, match="MoE layers are"):
        localize_neurons(model, _prompts(0, 5), _prompts(5, 9), {5: [0]})
    with pytest.raises(ValueError, match="'other' is empty"):
        localize_neurons(model, _prompts(0, 5), [], {0: [0]})
