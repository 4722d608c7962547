"""MLE convergence rates of softmax-gated Gaussian MoE, the simulations of two theory papers.

Claims tested, on ``gatelab.data.gaussian_moe`` samples (d = 1, x ~ N(0, 1)):

(a) "Statistical Perspective of Top-K Sparse Softmax Gating Mixture of Experts" (Nguyen,
    Akbarian, Yan, Ho; arXiv 2309.13850): with the true number of experts known (k = k*),
    the MLE of a top-K sparse softmax gated Gaussian MoE estimates the conditional density
    and the parameters at the parametric rate, n^(-1/2).
(b) "Is Temperature Sample Efficient for Softmax Gaussian Mixture of Experts?" (Nguyen,
    Akbarian, Ho; arXiv 2401.13875): with a learned temperature, the dense-to-sparse gate
    softmax((beta1 x + beta0) / tau) estimates its gating parameters slower than any
    polynomial rate, while the activation gate softmax(tanh(beta1 x + beta0) / tau) gets a
    polynomial rate; density estimation is parametric for both.

Protocol (ours; the papers' simulation constants are not reproduced):

- Ground truths are fixed by hand (``TRUTHS``), well separated so that the k = k* fit is
  well posed: (a) 3 experts, top-2 gate; (b) 2 experts, tau* = 1 (temperature gate) and
  tau* = 0.5 with tanh (activation gate). The last expert's gating parameters are 0 (the
  softmax's translation symmetry), as in ``GaussianMoEParams.random``.
- Fit: maximum likelihood by full-batch L-BFGS (strong Wolfe line search) in float64 on
  every parameter (beta1, beta0 of all but the last expert, log tau for (b), a, b,
  log sigma), from the truth plus N(0, 0.25^2) noise per parameter. Starting near the truth
  is what such simulations do to study the rate of the MLE, not the optimiser's search;
  it also keeps the expert labels aligned with the truth, so parameters are compared
  expert by expert (checked: ``labels_kept`` in the result, the fraction of fits whose
  expert means stay closest to their own true expert).
- Density error: E_x h(p_hat(.|x), p*(.|x)), the Hellinger distance between the fitted and
  true conditional densities, by quadrature on a y grid and a fixed Monte-Carlo sample of
  x. Parametric rate: slope -1/2.
- Parameter errors (the exact-specified Voronoi loss of the papers with one fitted atom per
  cell reduces to these sums of matched absolute differences; we drop the papers'
  exp(beta0) weights): ``gate`` = sum_i |dbeta1_i| + |dbeta0_i| (+ |dtau|),
  ``expert`` = sum_i |da_i| + |db_i| + |dnu_i| with nu = sigma^2, ``tau`` = |dtau|, and for
  the temperature gate ``gate/tau`` = the same sum on beta1/tau, beta0/tau, the gate's
  identifiable coordinates.
- Slopes: least squares of log(geometric mean over replicates) on log n.

Note on (b): softmax((beta1 x + beta0) / tau) is unchanged by (beta1, beta0, tau) ->
c (beta1, beta0, tau), so in the exact-specified model the likelihood is flat along that
ray; this is the PDE beta1 du/dbeta1 + beta0 du/dbeta0 + tau du/dtau = 0 the paper's proof
rests on, in its strongest form. The MLE then pins down beta/tau but not (beta, tau), and
the ``gate`` and ``tau`` errors need not fall with n at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ..data.synthetic import GaussianMoEParams, gaussian_moe
from ..routing.temperature import activation_scores, temperature_scores

NAME = "gating-theory"
DESCRIPTION = (
    "Gaussian-MoE MLE rates vs n: top-K sparse gate (parametric) and temperature vs "
    "activation dense-to-sparse gate (arXiv 2309.13850, 2401.13875)"
)

SCALES = {
    # sample sizes, replicates, L-BFGS iterations, x draws for the Hellinger average
    "smoke": dict(sizes=(200, 500), replicates=1, max_iter=25, x_eval=100),
    "full": dict(
        sizes=(1000, 2512, 6310, 15849, 39811, 100000),
        replicates=4,
        max_iter=400,
        x_eval=1000,
    ),
}
INIT_NOISE = 0.25
Y_GRID = torch.linspace(-10.0, 10.0, 1001, dtype=torch.float64)


def _params(*values, **gate) -> GaussianMoEParams:
    """GaussianMoEParams from lists (beta1, beta0, a, b, sigma) in float64."""
    return GaussianMoEParams(*(torch.tensor(v, dtype=torch.float64) for v in values), **gate)


TRUTHS = {
    "topk": _params(
        [[2.0], [-2.0], [0.0]],
        [0.5, 0.5, 0.0],
        [[1.5], [-1.5], [0.0]],
        [1.0, 1.0, -1.0],
        [0.4, 0.5, 0.3],
        top_k=2,
    ),
    "temperature": _params(
        [[2.0], [0.0]], [1.0, 0.0], [[1.0], [-1.0]], [1.0, -1.0], [0.5, 0.4], temperature=1.0
    ),
    "activation": _params(
        [[2.0], [0.0]],
        [1.0, 0.0],
        [[1.0], [-1.0]],
        [1.0, -1.0],
        [0.5, 0.4],
        temperature=0.5,
        activation="tanh",
    ),
}


# -- the model being fitted -----------------------------------------------------------------


@dataclass
class Fit:
    """Free parameters of a Gaussian MoE (float64 leaves); the last expert's gate is 0."""

    beta1: Tensor  # [k - 1, d]
    beta0: Tensor  # [k - 1]
    log_tau: Tensor  # [] (unused by the top-K gate, whose temperature is 1)
    a: Tensor  # [k, d]
    b: Tensor  # [k]
    log_sigma: Tensor  # [k]

    def tensors(self) -> list[Tensor]:
        return [self.beta1, self.beta0, self.log_tau, self.a, self.b, self.log_sigma]

    def to_params(self, truth: GaussianMoEParams) -> GaussianMoEParams:
        """The fitted model as a GaussianMoEParams with the truth's gate kind."""
        d = self.beta1.detach()
        beta1 = torch.cat([d, torch.zeros(1, d.shape[1], dtype=d.dtype)])
        beta0 = torch.cat([self.beta0.detach(), torch.zeros(1, dtype=d.dtype)])
        tau = math.exp(self.log_tau.item()) if truth.top_k is None else 1.0
        return GaussianMoEParams(
            beta1,
            beta0,
            self.a.detach().clone(),
            self.b.detach().clone(),
            self.log_sigma.detach().exp(),
            tau,
            truth.top_k,
            truth.activation,
        )


def init_fit(truth: GaussianMoEParams, gen: torch.Generator) -> Fit:
    """The truth plus N(0, INIT_NOISE^2) noise on every free parameter."""

    def noisy(t: Tensor) -> Tensor:
        noise = INIT_NOISE * torch.randn(t.shape, generator=gen, dtype=torch.float64)
        return (t.double() + noise).requires_grad_()

    return Fit(
        noisy(truth.beta1[:-1]),
        noisy(truth.beta0[:-1]),
        noisy(torch.tensor(math.log(truth.temperature))),
        noisy(truth.a),
        noisy(truth.b),
        noisy(truth.sigma.log()),
    )


def gate_log_probs(fit: Fit, x: Tensor, truth: GaussianMoEParams) -> Tensor:
    """log G(x) [N, k] of the fitted gate, of the truth's kind."""
    zeros = torch.zeros(1, x.shape[1], dtype=x.dtype)
    affine = x @ torch.cat([fit.beta1, zeros]).T
    beta0 = torch.cat([fit.beta0, torch.zeros(1, dtype=x.dtype)])
    if truth.top_k is not None:
        kth = affine.topk(truth.top_k, dim=1).values[:, -1:]
        masked = (affine + beta0).masked_fill(affine < kth, float("-inf"))
        return torch.log_softmax(masked, dim=1)
    tau = fit.log_tau.exp()
    if truth.activation is not None:
        return activation_scores(affine + beta0, tau, truth.activation).log()
    return temperature_scores(affine + beta0, tau).log()


def log_likelihood(fit: Fit, x: Tensor, y: Tensor, truth: GaussianMoEParams) -> Tensor:
    """Mean log p(y | x) under the fitted model."""
    sigma = fit.log_sigma.exp()
    mean = x @ fit.a.T + fit.b
    comp = -0.5 * ((y[:, None] - mean) / sigma) ** 2 - fit.log_sigma - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(gate_log_probs(fit, x, truth) + comp, dim=1).mean()


def fit_mle(truth: GaussianMoEParams, x: Tensor, y: Tensor, seed: int, max_iter: int) -> Fit:
    """Maximum likelihood by L-BFGS from a noisy copy of the truth.

    Not on ``_loop.train_loop``: L-BFGS evaluates the loss through a closure, several times a
    step, with its own line search; there are no batches or schedule to share."""
    fit = init_fit(truth, torch.Generator().manual_seed(seed))
    opt = torch.optim.LBFGS(
        fit.tensors(),
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = -log_likelihood(fit, x, y, truth)
        loss.backward()
        return loss

    opt.step(closure)
    return fit


# -- errors ---------------------------------------------------------------------------------


def mean_hellinger(p: GaussianMoEParams, q: GaussianMoEParams, x: Tensor) -> float:
    """E_x h(p(.|x), q(.|x)), h^2 = 1/2 int (sqrt p - sqrt q)^2 dy, trapezoid on Y_GRID."""
    n, m = x.shape[0], Y_GRID.shape[0]
    xs = x.repeat_interleave(m, dim=0)
    ys = Y_GRID.repeat(n)
    half_p = (0.5 * p.log_prob(xs, ys)).exp().view(n, m)
    half_q = (0.5 * q.log_prob(xs, ys)).exp().view(n, m)
    h2 = 0.5 * torch.trapezoid((half_p - half_q) ** 2, Y_GRID, dim=1)
    return float(h2.clamp_min(0).sqrt().mean())


def parameter_errors(fit: GaussianMoEParams, truth: GaussianMoEParams) -> dict[str, float]:
    """Matched absolute parameter differences (see the module docstring)."""

    def dist(u: Tensor, v: Tensor) -> float:
        return float((u.double() - v.double()).abs().sum())

    gate = dist(fit.beta1, truth.beta1) + dist(fit.beta0, truth.beta0)
    expert = dist(fit.a, truth.a) + dist(fit.b, truth.b) + dist(fit.sigma**2, truth.sigma**2)
    out = {"expert": expert}
    if truth.top_k is None:
        tau = abs(fit.temperature - truth.temperature)
        out.update(gate=gate + tau, tau=tau)
        if truth.activation is None:
            ft, tt = fit.temperature, truth.temperature
            ratio = dist(fit.beta1 / ft, truth.beta1 / tt) + dist(fit.beta0 / ft, truth.beta0 / tt)
            out["gate/tau"] = ratio
    else:
        out["gate"] = gate
    return out


def labels_kept(fit: GaussianMoEParams, truth: GaussianMoEParams) -> bool:
    """True when each fitted expert's (a, b, sigma) is closest to its own true expert."""
    f = torch.cat([fit.a, fit.b[:, None], fit.sigma[:, None]], dim=1).double()
    t = torch.cat([truth.a, truth.b[:, None], truth.sigma[:, None]], dim=1).double()
    nearest = torch.cdist(f, t).argmin(dim=1)
    return bool((nearest == torch.arange(len(f))).all())


# -- the run --------------------------------------------------------------------------------


def slope(sizes, errors) -> float:
    """Least-squares slope of log(error) on log(n)."""
    lx = torch.tensor([math.log(n) for n in sizes], dtype=torch.float64)
    ly = torch.tensor([math.log(max(e, 1e-300)) for e in errors], dtype=torch.float64)
    lx, ly = lx - lx.mean(), ly - ly.mean()
    return float((lx * ly).sum() / (lx * lx).sum())


def run_setting(name: str, cfg: dict, seed: int) -> dict:
    """Fit every (n, replicate) of one ground truth; errors per n as geometric means."""
    truth = TRUTHS[name]
    x_eval = torch.randn(cfg["x_eval"], 1, generator=torch.Generator().manual_seed(seed + 99))
    x_eval = x_eval.double()
    errors: dict[str, list[float]] = {}
    kept, fits = 0, 0
    for n in cfg["sizes"]:
        per_rep: dict[str, list[float]] = {}
        for rep in range(cfg["replicates"]):
            data_seed = seed * 1000 + rep * 7 + n
            data = gaussian_moe(n, params=truth, seed=data_seed)
            fit = fit_mle(truth, data.x.double(), data.y.double(), data_seed, cfg["max_iter"])
            fitted = fit.to_params(truth)
            found = parameter_errors(fitted, truth)
            found["density"] = mean_hellinger(fitted, truth, x_eval)
            for key, value in found.items():
                per_rep.setdefault(key, []).append(value)
            kept += labels_kept(fitted, truth)
            fits += 1
        for key, values in per_rep.items():
            logs = [math.log(max(v, 1e-300)) for v in values]
            errors.setdefault(key, []).append(math.exp(sum(logs) / len(logs)))
    slopes = {key: slope(cfg["sizes"], values) for key, values in errors.items()}
    return {"errors": errors, "slopes": slopes, "labels_kept": kept / fits}


def plot(results: dict, sizes, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    titles = {
        "topk": "(a) top-2 sparse softmax gate, k = k* = 3",
        "temperature": "(b) temperature gate softmax((Wx+b)/tau)",
        "activation": "(b) activation gate softmax(tanh(Wx+b)/tau)",
    }
    for ax, (name, res) in zip(axes, results.items(), strict=True):
        for key, values in res["errors"].items():
            ax.loglog(sizes, values, "o-", label=f"{key} (slope {res['slopes'][key]:.2f})")
        ref = [res["errors"]["density"][0] * (n / sizes[0]) ** -0.5 for n in sizes]
        ax.loglog(sizes, ref, "k--", lw=0.8, label="n^-1/2")
        ax.set_title(titles[name], fontsize=10)
        ax.set_xlabel("sample size n")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("error (geometric mean over replicates)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = ".") -> dict:
    cfg = SCALES[scale]
    torch.manual_seed(seed)
    results = {name: run_setting(name, cfg, seed) for name in TRUTHS}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "gating_theory.png"
    plot(results, cfg["sizes"], png)
    return {"table": table(results, cfg), "results": results, "plot": str(png)}


def table(results: dict, cfg: dict) -> str:
    sizes = cfg["sizes"]
    lines = [
        f"| gate | error | slope | at n={sizes[0]} | at n={sizes[-1]} |",
        "|---|---|---|---|---|",
    ]
    for name, res in results.items():
        for key, values in res["errors"].items():
            lines.append(
                f"| {name} | {key} | {res['slopes'][key]:.2f} | {values[0]:.3g} | {values[-1]:.3g} |"
            )
    kept = ", ".join(f"{name} {res['labels_kept']:.0%}" for name, res in results.items())
    lines.append("")
    lines.append(f"{cfg['replicates']} replicates per n; fits with expert labels kept: {kept}.")
    return "\n".join(lines)
