"""MoE-X's sparsity-aware router: route each token to the experts whose ReLU activation is
expected to be sparsest, estimated from the experts' own weights."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .routers import ROUTERS, Router, top_k
from .routing import Routing


@ROUTERS.register("moex")
class SparsityAwareRouter(Router):
    """Sparsity-aware routing of MoE-X: the top-k experts by expected activation sparsity.

    "Mixture of Experts Made Intrinsically Interpretable" (Yang et al., ICML 2025, arXiv
    2503.07639). Confirmed in the paper: ReLU experts, and a router that prefers "the
    experts with the highest activation sparsity", whose score correlates negatively with
    the experts' actual L0. The estimate below follows the notes' unverified recollection
    of the paper (a Gaussian approximation of each expert's pre-activations):

    For expert e with first-layer rows w_1..w_F (the gate rows of a GLU expert) and
    biases b_1..b_F, treat the rows as samples: per input coordinate d, mu_ed and
    var_ed are the mean and variance of w_jd over the F rows. The pre-activation
    h_j = w_j . x + b_j of a random unit is then approximately Gaussian with

        m_e(x) = mu_e . x + mean(b),   s_e(x)^2 = var_e . x^2 + var(b) + eps

    (coordinates treated as independent), so P(h_j > 0) = Phi(z_e) with z_e = m_e / s_e
    and the expected L0 of ReLU(W_e x + b_e) is F * Phi(z_e). The router's logits are
    -z_e / ``temperature``: ranking by them is ranking by expected L0, sparsest first
    (Phi is increasing and F is the same for every expert). scores = softmax(logits);
    the top ``top_k`` scores are the combine weights (``normalize`` renormalises them).
    ``aux["expected_l0"]`` [T, E] holds F * Phi(z).

    The estimate costs two [T, D] x [D, E] products, the cost of a linear router, instead
    of running every expert. The router has no weights of its own: it reads the bank it is
    bound to (:meth:`bind_experts`; a :class:`gatelab.layers.MoE` binds its router to its
    bank). Gradients flow through the gate into the
    experts' weights and the input unless ``detach_experts``. With an activation other than
    ReLU the score still ranks experts by their expected fraction of positive
    pre-activations.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 2,
        temperature: float = 1.0,
        normalize: bool = False,
        detach_experts: bool = False,
        eps: float = 1e-6,
        nan_policy: str = "raise",
    ):
        super().__init__(dim, num_experts, top_k, nan_policy, learned=False)
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.temperature, self.normalize = float(temperature), normalize
        self.detach_experts, self.eps = detach_experts, float(eps)
        # A plain attribute, not a submodule: the bank belongs to the MoE layer, and
        # registering it twice would store its tensors twice in a state dict.
        self.__dict__["_bank"] = None

    def bind_experts(self, bank: nn.Module) -> SparsityAwareRouter:
        """Route by the weights of ``bank`` (an ExpertBank, or any module with ``weights()``)."""
        w = bank.weights()
        if w.w_in.dim() != 3 or (w.w_in.shape[0], w.w_in.shape[2]) != (self.num_experts, self.dim):
            raise ValueError(
                f"the bank's input weights are {tuple(w.w_in.shape)}; this router needs "
                f"[num_experts={self.num_experts}, rows, dim={self.dim}]"
            )
        self.__dict__["_bank"] = bank
        return self

    @property
    def bank(self) -> nn.Module:
        if self._bank is None:
            raise RuntimeError(
                "SparsityAwareRouter reads the experts' weights: bind it first with "
                "router.bind_experts(bank) (gatelab.layers.MoE binds its router to its experts)"
            )
        return self._bank

    def first_layer(self) -> tuple[Tensor, Tensor | None]:
        """The rows whose activation is sparsified: [E, F, D] (gate rows for GLU) and biases."""
        w = self.bank.weights()
        hidden = w.w_out.shape[2]
        rows, bias = w.w_in[:, :hidden], None if w.b_in is None else w.b_in[:, :hidden]
        if self.detach_experts:
            rows, bias = rows.detach(), None if bias is None else bias.detach()
        return rows, bias

    def standardized_mean(self, x: Tensor) -> Tensor:
        """z [T, E]: the mean over standard deviation of a random unit's pre-activation."""
        rows, bias = self.first_layer()
        x = x.to(rows.dtype)
        mean = x @ rows.mean(dim=1).T
        var = (x * x) @ rows.var(dim=1, unbiased=False).T
        if bias is not None:
            mean = mean + bias.mean(dim=1)
            var = var + bias.var(dim=1, unbiased=False)
        return mean / (var + self.eps).sqrt()

    def forward(self, x: Tensor, token_ids=None, positions=None) -> Routing:
        z = self.standardized_mean(x)
        return self.route(self._logits(z), z=z)

    def compute_logits(self, x: Tensor) -> Tensor:
        """-z / temperature [T, E] float32: sparsest expected activation first."""
        return self._logits(self.standardized_mean(x))

    def _logits(self, z: Tensor) -> Tensor:
        logits = (-z / self.temperature).float()
        self._check_logits(logits)
        return logits

    def route(self, logits: Tensor, z: Tensor | None = None) -> Routing:
        """Top-k of softmax(logits); ``z`` (the forward passes it) gives the exact
        ``aux["expected_l0"]``, otherwise it is read back from the logits."""
        if z is None:
            z = -logits * self.temperature
        scores = logits.softmax(dim=-1)
        weights, experts = top_k(scores, self.top_k)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True).clamp_min(1e-20)
        hidden = self.first_layer()[0].shape[1]
        expected_l0 = hidden * 0.5 * (1.0 + torch.erf(z.detach().float() / math.sqrt(2.0)))
        return Routing(logits, scores, experts, weights, {"expected_l0": expected_l0})
