"""Dopamine gates (gatelab.adapt.dopamine) and the dopamine experiment."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

from gatelab import experiments
from gatelab.adapt.dopamine import (
    Dopamine,
    DopamineGate,
    activation_fraction,
    activation_sites,
    temperature_at,
)


def _mlp(width=12):
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(6, width),
            act1=nn.ReLU(),
            fc2=nn.Linear(width, width),
            act2=nn.ReLU(),
            head=nn.Linear(width, 3),
        )
    )


def test_gate_is_smooth_in_training_and_a_step_at_eval():
    gate = DopamineGate(4, temperature=0.5)
    with torch.no_grad():
        gate.threshold.copy_(torch.tensor([0.0, 0.5, -1.0, 2.0]))
        gate.gain.copy_(torch.tensor([1.0, 2.0, 0.5, 3.0]))
    a = torch.randn(7, 3, 4)
    gate.train()
    smooth = gate.gain * torch.sigmoid((a - gate.threshold) / 0.5) * a
    torch.testing.assert_close(gate(a), smooth)
    gate.eval()
    step = gate.gain * (a > gate.threshold).float() * a
    torch.testing.assert_close(gate(a), step)
    gate.hard = False  # forced smooth even in eval
    torch.testing.assert_close(gate(a), smooth)


def test_smooth_gate_tends_to_the_step_as_the_temperature_falls():
    gate = DopamineGate(5, temperature=1e-4).train()
    with torch.no_grad():
        gate.threshold.normal_()
    a = gate.threshold.detach() + torch.tensor([0.3, -0.2, 0.5, -0.7, 0.1])
    torch.testing.assert_close(gate(a), gate.gain * (a > gate.threshold) * a)


def test_untrained_adapter_reproduces_the_frozen_relu_model():
    model = _mlp().eval()
    x = torch.randn(9, 6)
    expected = model(x)
    dopa = Dopamine(model, x[:2])
    assert dopa.sites == ["act1", "act2"] == activation_sites(model)
    torch.testing.assert_close(dopa(x), expected, rtol=0, atol=0)
    assert dopa.trainable_parameters() == {"act1": 24, "act2": 24}
    # Every nonzero ReLU unit fires through an untrained hard gate.
    assert dopa.open_fraction(x) == pytest.approx(activation_fraction(model, x, dopa.sites))


def test_training_moves_only_the_gates():
    model = _mlp()
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    dopa = Dopamine(model, x[:2], temperature=1.0)
    gates = {k: v.clone() for k, v in dopa.gates.state_dict().items()}
    opt = torch.optim.Adam(dopa.gate_parameters(), lr=0.05)
    dopa.train()
    assert not model.training  # the frozen base stays in eval mode
    for step in range(5):
        dopa.set_temperature(temperature_at(step, 5, 1.0, 0.1))
        loss = nn.functional.cross_entropy(dopa(x), y)
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in dopa.gate_parameters())
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, frozen[k]), k
    assert any(not torch.equal(v, gates[k]) for k, v in dopa.gates.state_dict().items())
    # remove() takes the gates out: the base computes what it computed before.
    base = dopa.remove()
    clean = _mlp()
    clean.load_state_dict(frozen)
    torch.testing.assert_close(base(x), clean(x), rtol=0, atol=0)


def test_temperature_anneal_endpoints():
    assert temperature_at(0, 10, 1.0, 0.01) == pytest.approx(1.0)
    assert temperature_at(9, 10, 1.0, 0.01) == pytest.approx(0.01)
    assert temperature_at(0, 1, 1.0, 0.01) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="step < total_steps"):
        temperature_at(10, 10)


def test_bad_configurations():
    with pytest.raises(ValueError, match="width"):
        DopamineGate(0)
    with pytest.raises(ValueError, match="temperature"):
        DopamineGate(3, temperature=0.0)
    with pytest.raises(ValueError, match=r"activations \[\.\.\., 3\]"):
        DopamineGate(3)(torch.randn(2, 4))
    x = torch.randn(2, 6)
    with pytest.raises(ValueError, match="not modules of the model"):
        Dopamine(_mlp(), x, sites=["act9"])
    with pytest.raises(ValueError, match="no gate sites"):
        Dopamine(nn.Linear(6, 3), x)
    with pytest.raises(ValueError, match="temperature"):
        Dopamine(_mlp(), x).set_temperature(-1.0)


def test_experiment_smoke(tmp_path):
    result = experiments.get("dopamine").run("smoke", out_dir=tmp_path)
    assert {"frozen", "dopamine", "lora", "head"} <= set(result["summary"])
    assert result["dopamine_per_layer"] == {"act1": 64, "act2": 64}
    assert "| dopamine | 128 |" in result["table"]
