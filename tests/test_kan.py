"""KAT's group-rational KAN (GR-KAN) and S-KAN's selectable activation spaces."""

from __future__ import annotations

import pytest
import torch

from gatelab.layers.kan import (
    GRKANMLP,
    RATIONAL_INIT,
    SKAN,
    SPACES,
    TARGETS,
    GroupRational,
    SKANLayer,
    basis,
    fit_rational,
    rational,
    second_moment,
)

GRID = torch.linspace(-3, 3, 601, dtype=torch.float64)
# the safe 5/4 form fits GELU to 2.3e-3 at worst on [-3, 3], SiLU to 1.2e-6, identity exactly
TOLERANCE = {"identity": 1e-6, "gelu": 3e-3, "silu": 1e-5}


def _reference_rational(x, num, den):
    """P(x) / (1 + sum_i |b_i x^i|), written term by term."""
    p = sum(num[i] * x**i for i in range(6))
    q = 1 + sum((den[i] * x ** (i + 1)).abs() for i in range(4))
    return p / q


@pytest.mark.parametrize("init", sorted(RATIONAL_INIT))
def test_stored_coefficients_match_their_target(init):
    num, den = (torch.tensor(c, dtype=torch.float64) for c in RATIONAL_INIT[init])
    err = (_reference_rational(GRID, num, den) - TARGETS[init](GRID)).abs().max()
    assert err < TOLERANCE[init]


@pytest.mark.parametrize("init", ["gelu", "silu"])
def test_refit_on_a_coarse_grid_agrees_with_the_stored_fit(init):
    num, den = fit_rational(TARGETS[init], num_points=200, iterations=10)
    stored = [torch.tensor(c, dtype=torch.float64) for c in RATIONAL_INIT[init]]
    diff = _reference_rational(GRID, num, den) - _reference_rational(GRID, *stored)
    assert diff.abs().max() < 2 * TOLERANCE[init]
    assert bool((den >= 0).all())


def test_fit_is_exact_for_a_rational_in_the_family():
    num = torch.tensor([0.1, -0.5, 0.3, 0.2, -0.05, 0.01], dtype=torch.float64)
    den = torch.tensor([0.4, 0.0, 0.1, 0.02], dtype=torch.float64)
    got_num, got_den = fit_rational(lambda x: _reference_rational(x, num, den))
    assert torch.allclose(got_num, num, atol=1e-7) and torch.allclose(got_den, den, atol=1e-7)


def test_rational_matches_the_written_out_formula_per_group():
    num = torch.randn(6, dtype=torch.float64)
    den = torch.randn(3, 4, dtype=torch.float64)  # negative entries: |b| is used
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    got = rational(x, num, den)
    for g in range(3):
        assert torch.allclose(got[:, g], _reference_rational(x[:, g], num, den[g]))


@pytest.mark.parametrize("init", sorted(RATIONAL_INIT))
def test_group_rational_matches_its_target_at_initialisation(init):
    layer = GroupRational(24, num_groups=4, init=init).double()
    x = GRID[torch.randperm(len(GRID))[:240]].view(2, 5, 24)
    assert (layer(x) - TARGETS[init](x)).abs().max() < TOLERANCE[init]


def test_group_rational_shapes_parameters_and_dtypes():
    layer = GroupRational(32, num_groups=8)
    assert layer.numerator.shape == (1, 6) and layer.denominator.shape == (8, 4)
    assert sum(p.numel() for p in layer.parameters()) == 6 + 4 * 8
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.randn(3, 7, 32, dtype=dtype)
        assert layer(x).shape == x.shape and layer(x).dtype == dtype


def test_groups_use_their_own_denominator():
    layer = GroupRational(8, num_groups=2, init="gelu")
    with torch.no_grad():
        layer.denominator[1] += 1.0
    x = torch.full((1, 8), 2.0)
    y = layer(x)
    assert torch.allclose(y[0, :4], y[0, :1].expand(4))
    assert not torch.allclose(y[0, :4], y[0, 4:])


def test_gain_matches_kat():
    # KAT's gain.py: 1 / E[F^2] = 2.3568 (GELU), 2.8178 (SiLU) from its own fits, sampled
    for init, kat in (("gelu", 2.3568), ("silu", 2.8178)):
        num, den = (torch.tensor(c) for c in RATIONAL_INIT[init])
        assert abs(1 / second_moment(num, den.view(1, -1)) - kat) < 0.02
    num, den = (torch.tensor(c) for c in RATIONAL_INIT["identity"])
    assert abs(second_moment(num, den.view(1, -1)) - 1.0) < 1e-9


def test_grkan_mlp_parameter_count_and_gradients():
    dim, hidden, groups = 16, 64, 4
    mlp = GRKANMLP(dim, hidden, num_groups=groups, act="silu")
    expected = 2 * (6 + 4 * groups) + dim * hidden + hidden + hidden * dim + dim
    assert sum(p.numel() for p in mlp.parameters()) == expected
    no_bias = GRKANMLP(dim, hidden, num_groups=groups, bias=False)
    assert sum(p.numel() for p in no_bias.parameters()) == expected - hidden - dim
    x = torch.randn(2, 5, dim)
    y = mlp(x)
    assert y.shape == x.shape
    y.square().sum().backward()
    for name, p in mlp.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("act", ["gelu", "silu"])
def test_grkan_mlp_initialisation_preserves_variance(act):
    mlp = GRKANMLP(128, 512, num_groups=8, act=act)
    x = torch.randn(4096, 128)
    with torch.no_grad():
        hidden = mlp.fc1(mlp.act1(x))
        assert 0.85 < hidden.var().item() < 1.15
        assert 0.85 < mlp(x).var().item() < 1.15


def test_grkan_mlp_at_init_is_the_gelu_mlp():
    mlp = GRKANMLP(16, 32, num_groups=4).double()
    x = torch.randn(50, 16, dtype=torch.float64)
    ref = mlp.fc2(torch.nn.functional.gelu(mlp.fc1(x)))
    hidden = mlp.fc1(x)
    # the fit is accurate on [-3, 3]; compare where the hidden units stay inside it
    inside = (hidden.abs() < 3).all(dim=1)
    assert inside.sum() > 10
    assert (mlp(x) - ref)[inside].abs().max() < 3e-3 * 32 * mlp.fc2.weight.abs().max()


def test_registered_block_picks_groups_that_divide_both_widths():
    from gatelab.layers import MLPS

    mlp = MLPS.get("grkan")(dim=12, hidden_dim=20)
    assert mlp.act1.num_groups == mlp.act2.num_groups == 4
    assert GRKANMLP(16, 64, num_groups=None).act1.num_groups == 8


def test_bad_group_configurations_name_the_argument():
    with pytest.raises(ValueError, match=r"dim=10 must be a positive multiple of num_groups=4"):
        GroupRational(10, num_groups=4)
    with pytest.raises(ValueError, match=r"hidden_dim=30 must be a positive multiple"):
        GRKANMLP(16, 30, num_groups=4)
    with pytest.raises(ValueError, match="init must be one of"):
        GroupRational(8, 2, init="relu")
    with pytest.raises(ValueError, match="act must be"):
        GRKANMLP(8, 16, 2, act="relu")
    with pytest.raises(ValueError, match=r"expects \[\.\.\., dim=8\]"):
        GroupRational(8, 2)(torch.randn(3, 4))


# -- S-KAN ----------------------------------------------------------------------------------


def _cox_de_boor(x, num_basis, order=3):
    """Cubic B-splines by the recursion, knots spaced 2 / (num_basis - 3) from -1 - 3h."""
    h = 2.0 / (num_basis - order)
    knots = torch.arange(-order, num_basis + 1, dtype=x.dtype) * h - 1
    x = x.unsqueeze(-1)
    b = ((x >= knots[:-1]) & (x < knots[1:])).to(x.dtype)
    for k in range(1, order + 1):
        b = (x - knots[: -(k + 1)]) / (k * h) * b[..., :-1] + (knots[k + 1 :] - x) / (k * h) * b[
            ..., 1:
        ]
    return b


def test_bspline_closed_form_equals_the_recursion():
    x = torch.linspace(-1.5, 1.5, 97, dtype=torch.float64)
    for k in (4, 6, 9):
        assert torch.allclose(basis("bspline", x, k), _cox_de_boor(x, k), atol=1e-12)


def test_bases_are_their_textbook_functions():
    x = torch.linspace(-1, 1, 41, dtype=torch.float64)
    spline = basis("bspline", x, 8)
    assert torch.allclose(spline.sum(-1), torch.ones_like(x))  # partition of unity
    assert bool((spline >= 0).all())
    cheb = basis("chebyshev", x, 5)
    t = torch.tanh(x)
    assert torch.allclose(cheb[:, 4], torch.cos(4 * torch.arccos(t)))
    fourier = basis("fourier", x, 6)
    assert torch.allclose(fourier[:, 2], torch.sin(3 * torch.pi * x))
    assert torch.allclose(fourier[:, 3], torch.cos(torch.pi * x))
    rbf = basis("rbf", x, 5)
    assert torch.allclose(rbf[20, 2], torch.tensor(1.0, dtype=torch.float64))


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_skan_layer_parameter_counts_through_the_phases():
    dim, out, k = 3, 4, 8
    layer = SKANLayer(dim, out, num_basis=k)
    s = len(SPACES)
    assert _count(layer) == out * dim + s * out * dim * k + s * out + out
    layer.select()
    layer.prune()
    assert _count(layer) == out * dim + dim * k * out + out


def test_skan_phases_select_then_prune_keep_the_function():
    torch.manual_seed(1)
    layer = SKANLayer(3, 6, num_basis=6).double()
    with torch.no_grad():
        layer.logits.normal_()
    x = torch.rand(20, 3, dtype=torch.float64) * 2 - 1
    mixed = layer(x)
    choice = layer.select()
    assert torch.equal(choice, layer.logits.argmax(-1)) and layer.phase == "selected"
    selected = layer(x)
    # node j now computes only its chosen space
    for j in range(6):
        s = int(choice[j])
        phi = basis(layer.spaces[s], x, 6).flatten(-2) @ layer.coef[s][j]
        base = torch.nn.functional.silu(x) @ layer.base[j] + layer.bias[j]
        assert torch.allclose(selected[:, j], base + phi)
    assert not torch.allclose(mixed, selected)
    layer.prune()
    assert layer.phase == "pruned"
    assert torch.allclose(layer(x), selected)


def test_selective_training_ends_where_select_and_prune_begin():
    torch.manual_seed(2)
    net = SKAN([3, 4, 2], num_basis=6).double()
    with torch.no_grad():
        for layer in net.layers:
            layer.logits.normal_()
    x = torch.rand(16, 3, dtype=torch.float64) * 2 - 1
    mixed = net(x)
    net.freeze_weights()
    net.set_selection_strength(0.5)
    halfway = net(x)
    net.set_selection_strength(1.0)
    full = net(x)
    net.select()
    net.prune()
    assert torch.allclose(net(x), full)
    assert not torch.allclose(halfway, full) and not torch.allclose(halfway, mixed)
    with pytest.raises(ValueError, match="selection strength must lie in"):
        net.set_selection_strength(1.5)


def test_skan_gradients_reach_every_parameter_in_each_phase():
    net = SKAN([2, 4, 1], num_basis=6)
    x = torch.rand(32, 2) * 2 - 1
    net(x).square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    net.zero_grad()
    net.select()
    net.prune()
    net(x).square().sum().backward()
    for name, p in net.named_parameters():
        if p.numel():
            assert p.grad is not None, name


def test_skan_errors():
    with pytest.raises(ValueError, match="unknown activation space 'wavelet'"):
        SKANLayer(2, 2, spaces=["wavelet"])
    with pytest.raises(ValueError, match="even for the Fourier space"):
        SKANLayer(2, 2, num_basis=7)
    layer = SKANLayer(2, 2)
    with pytest.raises(RuntimeError, match="needs select"):
        layer.prune()
    with pytest.raises(ValueError, match=r"expects \[\.\.\., dim=2\]"):
        layer(torch.randn(4, 3))


def test_kan_fit_experiment_smoke(tmp_path):
    from gatelab import experiments

    result = experiments.get("kan-fit").run("smoke", seed=0, out_dir=tmp_path)
    assert "| exp_sin |" in result["table"]
    rows = result["rows"]
    assert {r["model"] for r in rows} == {"s-kan", "kan", "gr-kan", "mlp"}
    budget = next(r["params"] for r in rows if r["model"] == "kan")
    assert next(r["params"] for r in rows if r["model"] == "s-kan") == budget
    for r in rows:  # matched within one hidden unit's worth of parameters
        assert abs(r["params"] - budget) <= 0.15 * budget, r
        assert r["test_rmse"] == r["test_rmse"]  # not NaN
