"""Early exit, JEI-DNN (Regol, Chataoui, Coates; ICLR 2024): gates, losses, hardening, ECE."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from gatelab.adapt.early_exit import (
    EarlyExitNet,
    confidence_exit,
    evaluate_exits,
    exit_probabilities,
    expected_calibration_error,
    first_exit,
    gate_loss,
    gate_targets,
    train_exit_heads,
    train_jei,
    uncertainty_features,
    weighted_exit_loss,
)
from gatelab.data.transforms import mixed_transform


def small_net(dim=4, width=8, classes=3):
    blocks = [nn.Sequential(nn.Linear(dim, width), nn.ReLU())]
    blocks += [nn.Sequential(nn.Linear(width, width), nn.ReLU()) for _ in range(2)]
    heads = [nn.Linear(width, classes) for _ in range(2)]
    return EarlyExitNet(blocks, nn.Linear(width, classes), heads, exits_after=[0, 1])


def data(n=96, dim=4, classes=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=gen)
    return x, (x[:, 0] > 0).long() + (x[:, 1] > 1).long()


def test_uncertainty_features_hand_case():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.25]]))
    p_max, entropy, margin, entropy_pow = uncertainty_features(logits)[0].tolist()
    assert p_max == pytest.approx(0.5) and margin == pytest.approx(0.25)
    assert entropy == pytest.approx(-(0.5 * math.log(0.5) + 0.5 * math.log(0.25)), rel=1e-5)
    q = [2 / 3, 1 / 6, 1 / 6]  # p² renormalised
    assert entropy_pow == pytest.approx(-sum(v * math.log(v) for v in q), rel=1e-5)
    with pytest.raises(ValueError, match=r"logits must be \[T, C\]"):
        uncertainty_features(torch.zeros(3))


def test_exit_probabilities_product_form():
    g = torch.tensor([[0.5, 0.5], [1.0, 0.3], [0.0, 0.0]])
    p = exit_probabilities(g)
    torch.testing.assert_close(
        p, torch.tensor([[0.5, 0.25, 0.25], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    )
    rand = exit_probabilities(torch.rand(50, 4))
    torch.testing.assert_close(rand.sum(-1), torch.ones(50))


def test_gate_targets_and_balanced_loss():
    ce = torch.tensor([[2.0, 0.5, 0.1], [0.1, 0.1, 0.1]])
    costs = torch.tensor([0.2, 0.6, 1.0])
    best, targets = gate_targets(ce, costs, tradeoff=1.0)
    # sample 0: 2.2, 1.1, 1.1 -> first minimum, exit 1; sample 1: exit 0
    assert best.tolist() == [1, 0]
    assert targets.tolist() == [[0.0, 1.0], [1.0, 1.0]]
    best0, _ = gate_targets(ce, costs, tradeoff=0.0)
    assert best0.tolist() == [2, 0]  # λ = 0: the most accurate exit wins
    logits = torch.tensor([[0.3, -1.0], [2.0, 0.5]])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    ratio = 1 / 3  # one zero, three ones
    want = (bce[0, 0] + ratio * (bce[0, 1] + bce[1, 0] + bce[1, 1])) / 4
    torch.testing.assert_close(gate_loss(logits, targets), want)
    with pytest.raises(ValueError, match="tradeoff"):
        gate_targets(ce, costs, tradeoff=-1.0)


def test_weighted_exit_loss_keeps_each_sample_total_and_weights_gradients():
    torch.manual_seed(0)
    logits = [torch.randn(5, 3, requires_grad=True) for _ in range(2)]
    y = torch.randint(0, 3, (5,))
    p_exit = torch.tensor([[0.7, 0.2, 0.1]] * 4 + [[1.0, 0.0, 0.0]])
    loss = weighted_exit_loss(logits, y, p_exit)
    plain = sum(nn.functional.cross_entropy(z, y, reduction="none") for z in logits).mean()
    torch.testing.assert_close(loss, plain)  # value kept
    loss.backward()
    # the last sample exits at 0 with probability 1: exit 1 gets no gradient from it
    assert torch.equal(logits[1].grad[4], torch.zeros(3))
    assert logits[0].grad[4].abs().sum() > 0


def test_default_costs_count_multiply_adds():
    net = small_net()
    # exit 0: 4*8 + 8*3 + 4 gate = 60; exit 1: + 8*8 + 8*3 + 4 = 152; final: + 8*8 + 8*3 = 240
    torch.testing.assert_close(net.costs, torch.tensor([60.0, 152.0, 240.0]) / 240)
    assert net.num_exits == 3


def test_shapes_hardening_and_frozen_backbone():
    torch.manual_seed(0)
    net = small_net()
    x, y = data()
    logits = net.exit_logits(x)
    assert [tuple(z.shape) for z in logits] == [(96, 3)] * 3
    assert net.gate_logits(logits).shape == (96, 2)
    # hardened gates: a gate that always fires sends every sample out at its exit
    with torch.no_grad():
        net.gates[0].linear.bias.fill_(50.0)
    out, exits = net.predict(x)
    assert torch.equal(exits, torch.zeros(96, dtype=torch.long))
    torch.testing.assert_close(out, logits[0])
    with torch.no_grad():
        net.gates[0].linear.bias.fill_(-50.0)
        net.gates[1].linear.bias.fill_(-50.0)
    out, exits = net.predict(x)
    assert torch.equal(exits, torch.full((96,), 2))
    torch.testing.assert_close(net(x), logits[2])


def test_first_exit_and_confidence_exit():
    scores = torch.tensor([[0.2, 0.7], [0.1, 0.2], [0.5, 0.1]])
    assert first_exit(scores, 0.5).tolist() == [1, 2, 0]
    assert first_exit(scores, 1.0).tolist() == [2, 2, 2]
    confident = torch.tensor([[10.0, 0.0], [0.0, 0.0]])
    logits = [confident, confident.flip(0), torch.zeros(2, 2)]
    assert confidence_exit(logits, 0.9).tolist() == [0, 1]
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="threshold"):
            first_exit(scores, bad)


def test_training_changes_only_heads_and_gates():
    torch.manual_seed(0)
    net = small_net()
    frozen = {
        k: v.clone() for k, v in net.state_dict().items() if k.startswith(("blocks", "final_head"))
    }
    heads = [p.clone() for p in net.exit_heads.parameters()]
    gates = [p.clone() for p in net.gates.parameters()]
    x, y = data()
    train_exit_heads(net, x, y, steps=10)
    history = train_jei(net, x, y, tradeoff=0.5, rounds=2, gate_steps=10, head_steps=10)
    assert len(history) == 2 and all(math.isfinite(v) for h in history for v in h.values())
    state = net.state_dict()
    for key, value in frozen.items():
        assert torch.equal(state[key], value), key
    assert any(
        not torch.equal(a, b) for a, b in zip(heads, net.exit_heads.parameters(), strict=True)
    )
    assert any(not torch.equal(a, b) for a, b in zip(gates, net.gates.parameters(), strict=True))
    assert not any(p.requires_grad for p in net.blocks.parameters())


def test_gate_phase_learns_the_tradeoff():
    # a large λ makes the earliest exit optimal for every sample: the gates learn to fire
    torch.manual_seed(0)
    net = small_net()
    x, y = data()
    train_exit_heads(net, x, y, steps=30)
    train_jei(net, x, y, tradeoff=100.0, rounds=2, gate_steps=60, head_steps=5, lr=0.05)
    _, exits = net.predict(x)
    assert (exits == 0).float().mean() > 0.9


def test_ece_hand_case():
    confidence = torch.tensor([0.95, 0.95, 0.65, 0.35])
    correct = torch.tensor([1, 0, 1, 0])
    # bins of width 0.1: (0.9, 1] acc 0.5 conf 0.95; (0.6, 0.7] acc 1 conf 0.65;
    # (0.3, 0.4] acc 0 conf 0.35 -> 2/4 * 0.45 + 1/4 * 0.35 + 1/4 * 0.35
    want = 0.5 * 0.45 + 0.25 * 0.35 + 0.25 * 0.35
    assert expected_calibration_error(confidence, correct, num_bins=10) == pytest.approx(want)
    # one bin: |accuracy - mean confidence|
    assert expected_calibration_error(confidence, correct, num_bins=1) == pytest.approx(
        abs(0.5 - 0.725)
    )
    assert expected_calibration_error(torch.ones(4), torch.ones(4)) == 0.0
    assert expected_calibration_error(torch.zeros(0), torch.zeros(0)) == 0.0
    with pytest.raises(ValueError, match="num_bins"):
        expected_calibration_error(confidence, correct, num_bins=0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        expected_calibration_error(confidence + 1, correct)


def test_evaluate_exits_reports_compute_of_the_exit_taken():
    net = small_net()
    x, y = data()
    with torch.no_grad():
        logits = net.exit_logits(x)
    exits = torch.tensor([0, 2] * 48)
    result = evaluate_exits(net, logits, exits, y)
    assert result["compute"] == pytest.approx((net.costs[0] + net.costs[2]).item() / 2)
    assert result["exit_share"] == [0.5, 0.0, 0.5]


def test_bad_configurations():
    lin = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="at least 2 blocks"):
        EarlyExitNet([lin], nn.Linear(4, 2), [nn.Linear(4, 2)], [0])
    blocks = [nn.Linear(4, 4) for _ in range(3)]
    with pytest.raises(ValueError, match="exits_after must be increasing"):
        EarlyExitNet(blocks, nn.Linear(4, 2), [nn.Linear(4, 2)], [2])
    with pytest.raises(ValueError, match="exits_after must be increasing"):
        EarlyExitNet(blocks, nn.Linear(4, 2), [nn.Linear(4, 2)] * 2, [1, 0])
    with pytest.raises(ValueError, match="one exits_after index per exit head"):
        EarlyExitNet(blocks, nn.Linear(4, 2), [nn.Linear(4, 2)], [0, 1])
    with pytest.raises(ValueError, match="costs must be 2 increasing"):
        EarlyExitNet(blocks, nn.Linear(4, 2), [nn.Linear(4, 2)], [0], costs=[1.0, 1.0])
    with pytest.raises(ValueError, match="pass costs explicitly"):
        EarlyExitNet([nn.ReLU(), nn.ReLU()], nn.Linear(4, 2), [nn.Linear(4, 2)], [0])
    net = small_net()
    x, y = data()
    with pytest.raises(ValueError, match="rounds"):
        train_jei(net, x, y, tradeoff=1.0, rounds=0)
    with pytest.raises(ValueError, match="tradeoff"):
        train_jei(net, x, y, tradeoff=-0.1)


def test_mixed_transform():
    images = torch.rand(40, 1, 8, 8)
    out, which = mixed_transform(images, ("identity", "rot180"), seed=3)
    assert set(which.tolist()) == {0, 1}
    torch.testing.assert_close(out[which == 0], images[which == 0])
    torch.testing.assert_close(out[which == 1], images[which == 1].flip(-1).flip(-2))
    with pytest.raises(ValueError, match="names is empty"):
        mixed_transform(images, ())


def test_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("early-exit").run("smoke", seed=0, out_dir=tmp_path)
    assert "JEI-DNN accuracy" in result["table"]
    run = result["runs"][0]
    assert len(run["jei"]) == len(result["tradeoffs"]) == len(run["matched_baseline"])
    assert len(run["matched_same_heads"]) == len(run["jei"])
    for point in run["jei"] + run["matched_baseline"] + run["matched_same_heads"]:
        assert 0 < point["compute"] <= 1 and 0 <= point["ece"] <= 1
        assert sum(point["exit_share"]) == pytest.approx(1.0)
