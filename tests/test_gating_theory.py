"""The gating-theory experiment: its likelihood, distances and slope fit, and a smoke run."""

from __future__ import annotations

import math

import pytest
import torch

from gatelab import experiments
from gatelab.data import GaussianMoEParams, gaussian_moe
from gatelab.experiments import gating_theory as gt
from gatelab.routing import activation_scores


def one_gaussian(mean: float, sigma: float) -> GaussianMoEParams:
    values = ([[0.0]], [0.0], [[0.0]], [mean], [sigma])
    return GaussianMoEParams(*(torch.tensor(v, dtype=torch.float64) for v in values))


@pytest.mark.parametrize("name", sorted(gt.TRUTHS))
def test_fit_likelihood_matches_the_generator_at_the_truth(name):
    truth = gt.TRUTHS[name]
    data = gaussian_moe(500, params=truth, seed=1)
    fit = gt.init_fit(truth, torch.Generator().manual_seed(0))
    with torch.no_grad():  # zero the init noise: the fit sits at the truth
        for mine, true in zip(fit.tensors(), _free(truth), strict=True):
            mine.copy_(true)
    mine = gt.log_likelihood(fit, data.x, data.y, truth)
    want = truth.log_prob(data.x, data.y).mean()
    torch.testing.assert_close(mine.detach(), want)
    back = fit.to_params(truth)
    torch.testing.assert_close(back.log_prob(data.x, data.y), truth.log_prob(data.x, data.y))


def _free(p: GaussianMoEParams):
    tau = torch.tensor(math.log(p.temperature), dtype=torch.float64)
    return [p.beta1[:-1], p.beta0[:-1], tau, p.a, p.b, p.sigma.log()]


def test_hellinger_against_the_closed_form():
    # Two Gaussians of one sigma: h^2 = 1 - exp(-(m1 - m2)^2 / (8 sigma^2)).
    x = torch.zeros(3, 1, dtype=torch.float64)
    p, q = one_gaussian(0.0, 0.5), one_gaussian(0.3, 0.5)
    want = math.sqrt(1 - math.exp(-(0.3**2) / (8 * 0.25)))
    assert gt.mean_hellinger(p, q, x) == pytest.approx(want, rel=1e-6)
    assert gt.mean_hellinger(p, p, x) == 0.0


def test_temperature_gate_is_flat_along_the_scale_ray():
    # Why the raw (beta, tau) of the temperature gate need not converge: c (beta, tau)
    # gives the same model; the activation gate has no such symmetry.
    data = gaussian_moe(200, params=gt.TRUTHS["temperature"], seed=3)
    for name, same in (("temperature", True), ("activation", False)):
        p = gt.TRUTHS[name]
        scaled = GaussianMoEParams(
            3 * p.beta1,
            3 * p.beta0,
            p.a,
            p.b,
            p.sigma,
            3 * p.temperature,
            p.top_k,
            p.activation,
        )
        close = torch.allclose(scaled.log_prob(data.x, data.y), p.log_prob(data.x, data.y))
        assert close is same, name
    errors = gt.parameter_errors(scaled_temperature(), gt.TRUTHS["temperature"])
    assert errors["gate/tau"] == pytest.approx(0.0, abs=1e-12) and errors["tau"] == 2.0


def scaled_temperature() -> GaussianMoEParams:
    p = gt.TRUTHS["temperature"]
    return GaussianMoEParams(3 * p.beta1, 3 * p.beta0, p.a, p.b, p.sigma, 3.0)


def test_generator_activation_gate_matches_the_router_form():
    p = GaussianMoEParams.random(2, 4, seed=0, temperature=0.7, activation="sigmoid")
    x = torch.randn(50, 2)
    torch.testing.assert_close(
        p.gate(x), activation_scores(x @ p.beta1.T + p.beta0, 0.7, "sigmoid")
    )
    data = gaussian_moe(100, dim=2, num_experts=4, activation="tanh", seed=2)
    assert data.params.activation == "tanh"
    with pytest.raises(ValueError, match="activation must be one of"):
        GaussianMoEParams.random(2, 4, activation="relu")
    with pytest.raises(ValueError, match="activation or top_k"):
        GaussianMoEParams.random(2, 4, activation="tanh", top_k=2)


def test_slope_recovers_a_power_law():
    sizes = [100, 1000, 10000]
    assert gt.slope(sizes, [3 * n**-0.5 for n in sizes]) == pytest.approx(-0.5)


def test_mle_beats_its_start():
    truth = gt.TRUTHS["activation"]
    data = gaussian_moe(1000, params=truth, seed=4)
    start = gt.init_fit(truth, torch.Generator().manual_seed(4)).to_params(truth)
    fitted = gt.fit_mle(truth, data.x.double(), data.y.double(), 4, max_iter=50)
    after = gt.parameter_errors(fitted.to_params(truth), truth)
    before = gt.parameter_errors(start, truth)
    assert after["expert"] < before["expert"] and after["gate"] < before["gate"]


def test_smoke_run(tmp_path):
    result = experiments.get("gating-theory").run("smoke", seed=0, out_dir=tmp_path)
    assert (tmp_path / "gating_theory.png").stat().st_size > 0
    for name in ("topk", "temperature", "activation"):
        res = result["results"][name]
        assert set(res["slopes"]) >= {"density", "expert", "gate"}
        assert all(math.isfinite(v) for v in res["slopes"].values())
        assert f"| {name} | density |" in result["table"]
