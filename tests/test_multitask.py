"""Multi-task experts (shared-bottom, MMoE, CGC/PLE, HoME), their statistics, the MMoE data."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gatelab.data.synthetic import mmoe_synthetic
from gatelab.models.multitask import (
    CGC,
    MULTITASK_MODELS,
    PLE,
    ExpertGroup,
    FeatureGate,
    HoME,
    MMoE,
    expert_statistics,
)


@pytest.mark.parametrize("name", list(MULTITASK_MODELS))
def test_shapes_and_gradients_reach_every_parameter(name):
    model = MULTITASK_MODELS[name](12)
    if name == "home":
        model = HoME(12, task_groups=[[0, 2], [1]])
    out = model(torch.randn(9, 12))
    assert out.shape == (9, model.num_tasks)
    out.square().sum().backward()
    for pname, p in model.named_parameters():
        if pname.startswith("feature_gate.a"):
            continue  # B starts at zero, so A's gradient is zero at the first step by design
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


def test_ple_two_levels_and_cgc():
    assert isinstance(CGC(8), PLE) and CGC(8).num_levels == 1
    model = PLE(8, num_tasks=3, num_levels=3)
    assert model(torch.randn(5, 8)).shape == (5, 3)
    assert set(model.last_gates) == {0, 1, 2}
    names, weights = model.last_gates[1]
    assert names[:2] == ["L2.task1.0", "L2.task1.1"] and weights.shape == (5, 6)
    torch.testing.assert_close(weights.sum(1), torch.ones(5))


def test_expert_group_matches_per_expert_linear():
    group = ExpertGroup(3, 5, 4, act="relu")
    x = torch.randn(7, 5)
    out = group(x)
    for e in range(3):
        ref = torch.relu(x @ group.weight[e] + group.bias[e])
        torch.testing.assert_close(out[:, e], ref)
    private = torch.randn(7, 3, 5)
    out = group(private)
    for e in range(3):
        torch.testing.assert_close(
            out[:, e], torch.relu(private[:, e] @ group.weight[e] + group.bias[e])
        )


def test_expert_normalisation_aligns_expert_scales():
    group = ExpertGroup(4, 6, 32, act="silu", norm=True)
    with torch.no_grad():
        group.weight.mul_(torch.tensor([0.1, 1.0, 10.0, 100.0])[:, None, None])
    out = group(torch.randn(512, 6))
    scales = out.abs().mean((0, 2))
    assert scales.max() / scales.min() < 1.2  # without the norm the ratio is ~1000


def test_feature_gate_starts_as_identity_and_stays_in_0_2():
    gate = FeatureGate(3, 6, rank=2)
    v = torch.randn(4, 6)
    torch.testing.assert_close(gate(v), v[:, None].expand(4, 3, 6))
    with torch.no_grad():
        gate.b.normal_(0, 10)
    ratio = gate(v) / v[:, None]
    assert ratio.min() >= 0 and ratio.max() <= 2


def test_home_hierarchy_mask_hides_other_groups():
    """Task 1's own path (its experts and self-gate) never sees group 0's meta experts."""
    model = HoME(6, task_groups=[[0], [1]], num_shared=1, num_group=1).eval()
    with torch.no_grad():  # shut task 1's gate on the shared experts, which see all groups
        model.task_gates[1].weight.zero_()
        model.task_gates[1].bias.copy_(torch.tensor([-1e4, 0.0, 0.0]))
    x = torch.randn(5, 6)
    base = model(x)
    with torch.no_grad():
        model.meta.weight[1].normal_()  # meta expert 1 is group 0's (index 0 is shared)
    moved = model(x)
    torch.testing.assert_close(moved[:, 1], base[:, 1])
    assert not torch.allclose(moved[:, 0], base[:, 0])


def test_home_self_gate_is_a_residual_path():
    with_gate = HoME(6, self_gate=True)
    without = HoME(6, self_gate=False)
    assert with_gate.self_gates is not None and without.self_gates is None
    x = torch.randn(8, 6)
    with_gate(x).sum().backward()
    assert with_gate.self_gates[0].weight.grad.abs().sum() > 0


def test_statistics_zero_share_and_task_share():
    model = MMoE(4, num_experts=2, expert_dim=3)
    with torch.no_grad():
        model.experts.weight.zero_()
        model.experts.bias[0].fill_(-1.0)  # expert 0 dead: all outputs exactly zero
        model.experts.bias[1].fill_(1.0)
        for gate, logits in zip(model.gates, ([5.0, -5.0], [0.0, 0.0]), strict=True):
            gate.weight.zero_()
            gate.bias.copy_(torch.tensor(logits))
    model(torch.randn(10, 4))
    stats = expert_statistics(model)
    assert stats["zero_share"] == {"shared0": 1.0, "shared1": 0.0}
    w0 = 1 / (1 + math.exp(-10))
    share = w0 / (w0 + 0.5)  # task 0 gives expert 0 weight w0 per token, task 1 gives 0.5
    assert stats["task_share"]["shared0"] == pytest.approx([share, 1 - share], rel=1e-5)
    assert sum(stats["task_share"]["shared1"]) == pytest.approx(1.0)


def test_statistics_need_a_forward():
    with pytest.raises(RuntimeError, match="forward"):
        expert_statistics(MMoE(4))


def test_bad_configuration_errors():
    with pytest.raises(ValueError, match="num_experts must be a positive int"):
        MMoE(4, num_experts=0)
    with pytest.raises(ValueError, match="task_groups"):
        HoME(4, task_groups=[[0], [0, 1]])
    with pytest.raises(ValueError, match="task_groups"):
        HoME(4, task_groups=[[0], []])
    with pytest.raises(ValueError, match="act must be"):
        ExpertGroup(2, 4, 4, act="tanh")
    with pytest.raises(ValueError, match=r"x \[batch, dim=4\]"):
        MMoE(4)(torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"x \[batch, dim=4\]"):
        PLE(4)(torch.randn(2, 3, 4))


def test_zero_rows_are_fine():
    assert MMoE(4).eval()(torch.randn(0, 4)).shape == (0, 2)


@pytest.mark.parametrize("p", [0.0, 0.5, 0.9, 1.0, -0.3])
def test_mmoe_generator_realises_the_requested_correlation(p):
    data = mmoe_synthetic(40_000, correlation=p, dim=20, seed=1)
    w1, w2 = data.weights
    assert float(w1 @ w2 / (w1.norm() * w2.norm())) == pytest.approx(p, abs=1e-6)
    # the linear parts w_i^T x have Pearson correlation p (x ~ N(0, I))
    proj = data.x @ data.weights.T
    realised = torch.corrcoef(proj.T)[0, 1]
    assert float(realised) == pytest.approx(p, abs=0.02)


def test_mmoe_generator_label_correlation_grows_with_p():
    corr = [
        float(torch.corrcoef(mmoe_synthetic(20_000, correlation=p, seed=2).y.T)[0, 1])
        for p in (0.0, 0.5, 0.9, 1.0)
    ]
    assert corr == sorted(corr) and abs(corr[0]) < 0.05 and corr[-1] > 0.95


def test_multitask_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("multitask").run("smoke", seed=0, out_dir=tmp_path)
    json.dumps(result, allow_nan=False)  # the CLI writes result.json this way
    assert "HoME" in result["table"] and "MMoE" in result["table"]
    home = result["summary"]["HoME"]["1.0"]
    assert home["zero_mean"] == 0.0  # Swish experts have no exact zeros
    assert all(math.isfinite(m) for m in home["mse"])


def test_old_import_paths_warn_and_give_the_same_objects():
    import gatelab.layers
    import gatelab.layers.multitask

    for name, obj in (("MMoE", MMoE), ("PLE", PLE), ("HoME", HoME), ("CGC", CGC)):
        for module in (gatelab.layers, gatelab.layers.multitask):
            with pytest.warns(DeprecationWarning, match=f"gatelab.models.multitask.{name}"):
                assert getattr(module, name) is obj
    with pytest.warns(DeprecationWarning):
        assert gatelab.layers.expert_statistics is expert_statistics
    assert "MMoE" not in gatelab.layers.__all__
