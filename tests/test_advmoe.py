"""AdvMoE (gatelab.adapt.advmoe): the MoE-CNN, PGD-linf, TRADES, the alternating steps, and
the advmoe experiment's smoke run."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gatelab import experiments
from gatelab.adapt.advmoe import (
    AdvMoEConfig,
    AttackConfig,
    MoECNN,
    MoEConv2d,
    advmoe_step,
    count_macs,
    expert_step,
    pgd_linf,
    router_step,
    trades_kl,
    trades_loss,
    trades_step,
)

ATTACK = AttackConfig(eps=0.1, step_size=0.05, steps=2)


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g), torch.randint(10, (n,), generator=g)


def _snapshot(params):
    return [p.detach().clone() for p in params]


@pytest.mark.parametrize("num_experts,ratio", [(1, 1.0), (2, 0.5), (3, 0.25)])
def test_shapes_and_router_outputs(num_experts, ratio):
    torch.manual_seed(0)
    cfg = AdvMoEConfig(num_experts=num_experts, ratio=ratio, widths=(8, 16, 16))
    model = MoECNN(cfg)
    x, _ = _batch(5)
    out = model(x)
    assert out.logits.shape == (5, 10)
    assert len(out.router_logits) == (3 if num_experts > 1 else 0)
    assert all(r.shape == (5, num_experts) for r in out.router_logits)
    assert model(x[:0]).logits.shape == (0, 10)  # zero images are a normal case
    model.eval()
    assert model(x[:0]).logits.shape == (0, 10)


def test_eval_gathered_path_matches_masked_training_path():
    torch.manual_seed(1)
    layer = MoEConv2d(3, 4, 3, router_dim=5)
    x = torch.randn(7, 3, 6, 6)
    masked, logits = layer.train()(x)
    gathered, _ = layer.eval()(x)
    torch.testing.assert_close(gathered, masked, atol=1e-5, rtol=1e-5)
    # the chosen group's filters, computed by hand for one image
    i, e = 2, int(logits[2].argmax())
    w = layer.weight[e * 4 : (e + 1) * 4]
    ref = F.conv2d(x[i : i + 1], w, layer.bias[e * 4 : (e + 1) * 4], padding=1)
    torch.testing.assert_close(gathered[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_gradients_reach_router_and_experts():
    torch.manual_seed(0)
    model = MoECNN(AdvMoEConfig(widths=(8, 16, 16)))
    x, y = _batch()
    F.cross_entropy(model(x).logits, y).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert model.router_parameters() and model.expert_parameters()
    ids = {id(p) for p in model.router_parameters()} | {id(p) for p in model.expert_parameters()}
    assert len(ids) == len(list(model.parameters()))


@pytest.mark.parametrize("step", ["expert", "router"])
def test_alternating_steps_update_only_their_group(step):
    torch.manual_seed(0)
    model = MoECNN(AdvMoEConfig(widths=(8, 16, 16)))
    x, y = _batch(16)
    mine = model.expert_parameters() if step == "expert" else model.router_parameters()
    other = model.router_parameters() if step == "expert" else model.expert_parameters()
    before_mine, before_other = _snapshot(mine), _snapshot(other)
    opt = torch.optim.SGD(mine, lr=0.1, momentum=0.9, weight_decay=5e-4)
    fn = expert_step if step == "expert" else router_step
    fn(model, x, y, opt, ATTACK, generator=torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(before_other, other, strict=True))
    assert any(not torch.equal(a, b) for a, b in zip(before_mine, mine, strict=True))
    assert all(p.requires_grad for p in model.parameters())  # restored after the step


def test_advmoe_step_moves_both_groups_and_trades_step_moves_all():
    torch.manual_seed(0)
    model = MoECNN(AdvMoEConfig(widths=(8, 16, 16)))
    x, y = _batch(16)
    experts, routers = _snapshot(model.expert_parameters()), _snapshot(model.router_parameters())
    eo = torch.optim.Adam(model.expert_parameters(), lr=1e-2)
    ro = torch.optim.Adam(model.router_parameters(), lr=1e-2)
    le, lr_ = advmoe_step(model, x, y, eo, ro, ATTACK)
    assert le > 0 and lr_ > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(experts, model.expert_parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(routers, model.router_parameters(), strict=True)
    )
    dense = MoECNN(AdvMoEConfig(num_experts=1, ratio=1.0, widths=(8, 16, 16)))
    before = _snapshot(dense.parameters())
    trades_step(dense, x, y, torch.optim.Adam(dense.parameters(), lr=1e-2), ATTACK)
    assert all(not torch.equal(a, b) for a, b in zip(before, dense.parameters(), strict=True))


def test_pgd_stays_in_the_ball_and_range_and_solves_a_linear_case():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g)
    x[0, 0, 0, :4] = torch.tensor([0.0, 1.0, 0.02, 0.99])  # near the range's edges
    w = torch.randn(1, 1, 8, 8, generator=g)

    def loss(z):
        return (z * w).sum()

    eps = 0.1
    x_adv = pgd_linf(loss, x, eps=eps, step_size=0.03, steps=10, generator=g)
    assert (x_adv - x).abs().max() <= eps + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert loss(x_adv) > loss(x)
    # a linear loss is maximised at x + eps·sign(w), clipped to [0, 1]
    best = (x + eps * w.sign()).clamp(0, 1)
    torch.testing.assert_close(x_adv, best, atol=1e-6, rtol=0)
    for start in ("normal", "none"):
        z = pgd_linf(loss, x, eps=eps, step_size=0.03, steps=0, start=start, generator=g)
        assert (z - x).abs().max() <= eps and z.min() >= 0 and z.max() <= 1


def test_pgd_raises_the_loss_of_a_model():
    torch.manual_seed(0)
    model = MoECNN(AdvMoEConfig(widths=(8, 16, 16))).eval()
    x, y = _batch(16)

    def ce(z):
        return F.cross_entropy(model(z).logits, y)

    x_adv = pgd_linf(ce, x, eps=0.2, step_size=0.05, steps=5)
    assert ce(x_adv) > ce(x)


def test_trades_kl_and_loss_reference():
    g = torch.Generator().manual_seed(0)
    clean, adv = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    p, q = clean.softmax(-1), adv.softmax(-1)
    ref = (p * (p.log() - q.log())).sum(-1).mean()  # KL(clean || adv), per image mean
    torch.testing.assert_close(trades_kl(adv, clean), ref)
    assert float(trades_kl(clean, clean)) == pytest.approx(0.0, abs=1e-6)
    y = torch.tensor([0, 1, 2, 3, 0])
    torch.testing.assert_close(trades_loss(clean, adv, y, 6.0), F.cross_entropy(clean, y) + 6 * ref)


def test_count_macs_dense_by_hand_and_moe_is_cheaper():
    cfg = AdvMoEConfig(num_experts=1, ratio=1.0, widths=(4, 6, 5))
    x = torch.rand(3, 1, 8, 8)
    hand = 64 * 4 * 1 * 9 + 64 * 6 * 4 * 9 + 16 * 5 * 6 * 9 + 5 * 10
    assert count_macs(MoECNN(cfg), x) == hand
    moe = MoECNN(AdvMoEConfig(num_experts=2, ratio=0.5, widths=(4, 6, 5), router_dim=2))
    experts = 64 * 2 * 1 * 9 + 64 * 3 * 2 * 9 + 16 * 2 * 3 * 9 + 2 * 10
    routers = 64 * 2 * 1 * 9 + 2 * 2 + 64 * 2 * 2 * 9 + 2 * 2 + 16 * 2 * 3 * 9 + 2 * 2
    assert count_macs(moe, x) == experts + routers


def test_bad_configs_and_inputs_raise():
    with pytest.raises(ValueError, match="num_experts"):
        AdvMoEConfig(num_experts=0)
    with pytest.raises(ValueError, match="ratio"):
        AdvMoEConfig(ratio=1.5)
    with pytest.raises(ValueError, match="no channel"):
        AdvMoEConfig(ratio=0.01, widths=(4,))
    with pytest.raises(ValueError, match="kernel_size"):
        AdvMoEConfig(kernel_size=2)
    with pytest.raises(ValueError, match="eps"):
        AttackConfig(eps=-0.1)
    with pytest.raises(ValueError, match="start"):
        pgd_linf(lambda z: z.sum(), torch.rand(2, 3), eps=0.1, step_size=0.1, steps=1, start="x")
    with pytest.raises(ValueError, match="step_size"):
        pgd_linf(lambda z: z.sum(), torch.rand(2, 3), eps=0.1, step_size=0.0, steps=1)
    model = MoECNN(AdvMoEConfig(widths=(4, 4, 4)))
    with pytest.raises(ValueError, match=r"x must be \[B, 1, H, W\]"):
        model(torch.rand(2, 3, 8, 8))
    with pytest.raises(ValueError, match="beta"):
        trades_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), -1)
    dense = MoECNN(AdvMoEConfig(num_experts=1, ratio=1.0, widths=(4, 4, 4)))
    opt = torch.optim.SGD(dense.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="num_experts >= 2"):
        advmoe_step(dense, *_batch(2), opt, opt, ATTACK)


def test_advmoe_experiment_smoke(tmp_path):
    result = experiments.get("advmoe").run("smoke", seed=0, out_dir=tmp_path)
    assert "advmoe" in result["table"] and "moe-trades" in result["table"]
    s = result["summary"]
    assert s["advmoe"]["macs"] < s["dense"]["macs"]
    assert all(0 <= s[a]["pgd"] <= 1 and 0 <= s[a]["clean"] <= 1 for a in s)
