"""MoHETS (heterogeneous-expert patch encoder), its layers, the DLinear baseline, the experiment."""

from __future__ import annotations

import math

import pytest
import torch

from gatelab.experiments import get
from gatelab.models.mohets import (
    DLinear,
    DwConvExpert,
    FANLayer,
    MoHELayer,
    MoHETS,
    MoHETSConfig,
    moving_average,
)
from gatelab.routing import EMPTY


def _small(**changes) -> MoHETSConfig:
    sizes = dict(lookback=12, horizon=5, patch_len=3, dim=8, hidden_dim=12, num_heads=2)
    return MoHETSConfig(**{**sizes, **changes})


@pytest.mark.parametrize("num_exog", [0, 3])
@pytest.mark.parametrize("kinds", [("fan", "dwconv"), ("mlp", "mlp")])
def test_shapes_and_gradients_reach_every_parameter(num_exog, kinds):
    model = MoHETS(_small(num_exog=num_exog, expert_kind=kinds[0], shared_kind=kinds[1]))
    x = torch.randn(4, 12, 2)
    exog = torch.randn(4, 12, num_exog) if num_exog else None
    y = model(x, exog)
    assert y.shape == (4, 5, 2)
    (y.pow(2).mean() + model.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert missing == []


def test_patch_len_must_divide_lookback():
    with pytest.raises(ValueError, match="patch_len=5 must divide lookback=12"):
        _small(patch_len=5)


def test_bad_inputs_name_the_argument():
    model = MoHETS(_small())
    with pytest.raises(ValueError, match="lookback=12"):
        model(torch.randn(2, 10, 1))
    with pytest.raises(ValueError, match="num_exog=0"):
        model(torch.randn(2, 12, 1), torch.randn(2, 12, 2))
    with pytest.raises(ValueError, match="kind"):
        MoHELayer(8, 12, expert_kind="kan")


def test_revin_makes_the_forecast_follow_shift_and_scale():
    # instance normalisation: forecasting a*x + b gives a*f(x) + b
    model = MoHETS(_small()).eval()
    x = torch.randn(3, 12, 2)
    with torch.no_grad():
        assert torch.allclose(model(2.5 * x + 7.0), 2.5 * model(x) + 7.0, atol=1e-4)


def test_sorted_dispatch_matches_dense_reference_with_idle_experts():
    layer = MoHELayer(8, 12, num_experts=5, top_k=2)
    tokens = torch.randn(7, 8)
    routing = layer.router(tokens)
    assert torch.allclose(
        layer.routed(tokens, routing), layer.dense_reference(tokens, routing), atol=1e-6
    )
    # empty slots and experts nobody picked: the dispatch must skip them, not fail
    experts = routing.experts.clone()
    experts[:, 1] = EMPTY
    experts[:, 0] = torch.tensor([0, 0, 3, 3, 0, 3, 0])
    sparse = routing.replace(experts=experts, weights=routing.weights * (experts != EMPTY))
    assert torch.allclose(
        layer.routed(tokens, sparse), layer.dense_reference(tokens, sparse), atol=1e-6
    )
    assert layer.routed(tokens[:0], layer.router(tokens[:0])).shape == (0, 8)


def test_mohe_output_is_shared_plus_weighted_routed_experts():
    layer = MoHELayer(8, 12, num_experts=4, top_k=2)
    x = torch.randn(2, 6, 8)
    tokens = x.reshape(-1, 8)
    routing = layer.router(tokens)
    expected = layer.shared(x) + layer.dense_reference(tokens, routing).view_as(x)
    assert torch.allclose(layer(x), expected, atol=1e-6)
    assert torch.allclose(routing.weights.sum(-1), torch.ones(12))  # normalised top-k


def test_fan_layer_is_cos_sin_gelu():
    fan = FANLayer(5, 16)
    x = torch.randn(3, 5)
    out = fan(x)
    p = fan.periodic(x)
    assert out.shape == (3, 16) and p.shape[1] == 4
    assert torch.allclose(out[:, :4], torch.cos(p)) and torch.allclose(out[:, 4:8], torch.sin(p))
    assert torch.allclose(out[:, 8:], torch.nn.functional.gelu(fan.gated(x)))


def test_dwconv_expert_mixes_neighbouring_patches_only():
    expert = DwConvExpert(4, 8)
    x = torch.randn(1, 9, 4)
    moved = x.clone()
    moved[0, 0] += 1.0  # patch 0 reaches patches 0 and 1 only (kernel 3)
    diff = (expert(moved) - expert(x)).abs().sum(-1)[0]
    assert diff[:2].min() > 0 and diff[2:].max() == 0


def test_dlinear_decomposition_sums_back_and_is_a_centred_moving_average():
    model = DLinear(lookback=10, horizon=3, kernel_size=25)
    assert model.kernel_size == 9  # capped at the largest odd size <= lookback
    x = torch.randn(2, 10, 3)
    seasonal, trend = model.decompose(x)
    assert torch.allclose(seasonal + trend, x, atol=1e-6)
    padded = torch.cat([x[:, :1].repeat(1, 4, 1), x, x[:, -1:].repeat(1, 4, 1)], dim=1)
    reference = torch.stack([padded[:, t : t + 9].mean(1) for t in range(10)], dim=1)
    assert torch.allclose(trend, reference, atol=1e-6)
    assert model(x).shape == (2, 3, 3)
    with pytest.raises(ValueError, match="odd"):
        moving_average(x, 4)


def test_patch_decoder_handles_horizon_not_a_multiple_of_patch():
    model = MoHETS(_small(horizon=7))
    assert model.decoder.to_out.out_features == math.ceil(7 / 3)
    assert model(torch.randn(2, 12, 1)).shape == (2, 7, 1)


def test_smoke_experiment_reports_every_model(tmp_path):
    result = get("mohets").run("smoke", seed=0, out_dir=tmp_path)
    for model in ("DLinear", "MoE-MLP", "MoHETS"):
        assert f"| macrodata | {model} |" in result["table"]
        mean = result["results"][f"macrodata/{model}"]["mean"]
        assert all(math.isfinite(v) for v in mean.values())
