"""Synthetic tasks with their papers' parameters: MQAR, Gaussian MoE regression, MMoE tasks.

Every generator takes a ``seed`` and draws from its own ``torch.Generator``, so the same
arguments give the same tensors in every process, whatever the global RNG state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

IGNORE_INDEX = -100

# The activations of the activation dense-to-sparse gate (data may not import routing).
GATE_ACTIVATIONS = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": torch.nn.functional.gelu}


# -- MQAR ----------------------------------------------------------------------------------


@dataclass
class MQARData:
    """inputs int64 [N, seq_len]; labels int64 [N, seq_len], ``IGNORE_INDEX`` except at
    query positions, where the label is the value bound to the key at that position."""

    inputs: torch.Tensor
    labels: torch.Tensor


def _distinct(num: int, low: int, high: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """[num, k] integers in [low, high), distinct within each row, uniform over k-subsets."""
    span = high - low
    if 4 * k > span:  # dense: a random permutation per row
        return torch.argsort(torch.rand(num, span, generator=gen), dim=1)[:, :k] + low
    out = torch.randint(low, high, (num, k), generator=gen)
    while True:  # sparse: redraw the rows that repeat a number
        s = out.sort(dim=1).values
        bad = (s[:, 1:] == s[:, :-1]).any(dim=1).nonzero().squeeze(1)
        if not len(bad):
            return out
        out[bad] = torch.randint(low, high, (len(bad), k), generator=gen)


def _check_mqar(
    vocab_size: int, seq_len: int, num_kv_pairs: int, power_a: float, num_passes: int
) -> None:
    if seq_len % 2:
        raise ValueError(f"seq_len must be even, got {seq_len}")
    if vocab_size <= seq_len:
        raise ValueError(f"vocab_size must exceed seq_len, got {vocab_size} <= {seq_len}")
    context = 2 * num_kv_pairs * num_passes
    if num_kv_pairs < 1 or num_passes < 1 or context + 2 * num_kv_pairs > seq_len:
        raise ValueError(
            f"need 2 * num_kv_pairs * (num_passes + 1) <= seq_len, got num_kv_pairs="
            f"{num_kv_pairs}, num_passes={num_passes}, seq_len={seq_len}"
        )
    if vocab_size // 2 - 1 < num_kv_pairs:
        raise ValueError(f"vocab_size={vocab_size} has too few keys for {num_kv_pairs} pairs")
    if power_a <= 0:
        raise ValueError(f"power_a must be > 0, got {power_a}")


def mqar(
    num_examples: int,
    *,
    vocab_size: int = 8192,
    seq_len: int = 64,
    num_kv_pairs: int = 4,
    power_a: float = 0.01,
    num_passes: int = 1,
    random_non_queries: bool = True,
    seed: int = 0,
) -> MQARData:
    """Multi-query associative recall (Zoology, Arora et al. 2023, arXiv 2312.04927).

    Follows ``zoology/data/multiquery_ar.py``:

    1. Keys are ``num_kv_pairs`` distinct tokens from [1, V/2), values distinct tokens from
       [V/2, V) (V = ``vocab_size``); the context ``k1 v1 k2 v2 ...`` (2 * num_kv_pairs
       tokens) is repeated ``num_passes`` times (the JRT variant; 1 in Zoology).
    2. The ``space = (seq_len - context) // 2`` even slots after the context get the keys
       again as queries, at slots ("gaps") drawn without replacement with
       P(g) proportional to a (g + 1)^(a - 1), a = ``power_a``: with a = 0.01 queries crowd
       near the context, as repeated bigrams do in text; a = 1 is uniform.
    3. A query key at position t has its value as label at t (next-token prediction, already
       shifted); every other label is ``IGNORE_INDEX``.
    4. With ``random_non_queries`` the remaining zeros become uniform tokens from [0, V).

    Checks as Zoology's asserts: ``seq_len`` even, ``vocab_size > seq_len``,
    ``2 * num_kv_pairs * (num_passes + 1) <= seq_len``. Zoology's Figure 2 sweep uses
    V = 8192, (seq_len, num_kv_pairs) in {(64, 4), (128, 8), (256, 16)}, 100k train and 3k
    test examples and ``random_non_queries=False``. Departure: numbers come from a torch
    generator, so a seed does not reproduce Zoology's numpy draws.
    """
    _check_mqar(vocab_size, seq_len, num_kv_pairs, power_a, num_passes)
    context, half = 2 * num_kv_pairs * num_passes, vocab_size // 2
    gen = torch.Generator().manual_seed(seed)
    n = num_examples
    keys = _distinct(n, 1, half, num_kv_pairs, gen)
    values = _distinct(n, half, vocab_size, num_kv_pairs, gen)
    inputs = torch.zeros(n, seq_len, dtype=torch.int64)
    pairs = torch.stack([keys, values], dim=2).reshape(n, 2 * num_kv_pairs)
    inputs[:, :context] = pairs.repeat(1, num_passes)
    space = (seq_len - context) // 2
    g = torch.arange(1, space + 1, dtype=torch.float64)
    p = power_a * g ** (power_a - 1)
    gaps = torch.multinomial((p / p.sum()).expand(n, space), num_kv_pairs, generator=gen)
    where = context + 2 * gaps
    inputs.scatter_(1, where, keys)
    labels = torch.full((n, seq_len), IGNORE_INDEX, dtype=torch.int64)
    labels.scatter_(1, where, values)
    if random_non_queries:
        noise = torch.randint(vocab_size, (n, seq_len), generator=gen)
        inputs = torch.where(inputs == 0, noise, inputs)
    return MQARData(inputs, labels)


# -- Gaussian mixture of experts -----------------------------------------------------------


@dataclass
class GaussianMoEParams:
    """True parameters of a softmax-gated Gaussian mixture of experts.

    p(y | x) = sum_i G_i(x) N(y | a_i^T x + b_i, sigma_i^2) with the gate

    - dense (``top_k=None``; "Is Temperature Sample Efficient for Softmax Gaussian MoE?",
      Nguyen, Akbarian, Ho, arXiv 2401.13875): G(x) = softmax((beta1 x + beta0) / temperature);
    - top-K sparse ("Statistical Perspective of Top-K Sparse Softmax Gating MoE", Nguyen et
      al., arXiv 2309.13850): the K largest beta1_i^T x keep beta1_i^T x + beta0_i, the rest
      -inf, then the softmax (divided by ``temperature``, 1 in that paper).

    - activation dense-to-sparse (``activation`` set; arXiv 2401.13875, the proposed gate):
      G(x) = softmax(act(beta1 x + beta0) / temperature), act one of ``GATE_ACTIVATIONS``
      ("tanh", "sigmoid", "gelu"), the bias inside act as ``gatelab.routing`` reads it.

    ``sigma`` is the standard deviation; the papers write the variance nu = sigma^2.
    """

    beta1: torch.Tensor  # [num_experts, dim] gating slopes
    beta0: torch.Tensor  # [num_experts] gating intercepts
    a: torch.Tensor  # [num_experts, dim] expert slopes
    b: torch.Tensor  # [num_experts] expert intercepts
    sigma: torch.Tensor  # [num_experts] expert standard deviations
    temperature: float = 1.0
    top_k: int | None = None
    activation: str | None = None

    def __post_init__(self):
        e, d = self.beta1.shape
        for name, shape in (("beta0", (e,)), ("a", (e, d)), ("b", (e,)), ("sigma", (e,))):
            if tuple(getattr(self, name).shape) != shape:
                raise ValueError(
                    f"{name} must have shape {shape}, got {tuple(getattr(self, name).shape)}"
                )
        if self.top_k is not None and not 1 <= self.top_k <= e:
            raise ValueError(f"top_k must be in [1, num_experts={e}], got {self.top_k}")
        if self.temperature <= 0 or bool((self.sigma <= 0).any()):
            raise ValueError("temperature and every sigma must be > 0")
        if self.activation is not None:
            if self.activation not in GATE_ACTIVATIONS:
                raise ValueError(
                    f"activation must be one of {sorted(GATE_ACTIVATIONS)} or None, "
                    f"got {self.activation!r}"
                )
            if self.top_k is not None:
                raise ValueError("pass activation or top_k, not both: no paper combines them")

    @property
    def num_experts(self) -> int:
        return self.beta1.shape[0]

    @property
    def dim(self) -> int:
        return self.beta1.shape[1]

    @classmethod
    def random(
        cls,
        dim: int,
        num_experts: int,
        *,
        seed: int = 0,
        sigma: float = 0.5,
        temperature: float = 1.0,
        top_k: int | None = None,
        dtype: torch.dtype = torch.float32,
        activation: str | None = None,
    ) -> GaussianMoEParams:
        """beta1, beta0, a, b drawn N(0, 1) and every sigma equal to ``sigma``.

        The last expert's gating parameters are 0: the softmax is unchanged by adding one
        vector to every expert's, so this fixes the parameters the estimators are compared
        against. These draws are ours; the papers' simulation values are not reproduced.
        """
        gen = torch.Generator().manual_seed(seed)
        beta1 = torch.randn(num_experts, dim, generator=gen, dtype=torch.float64)
        beta0 = torch.randn(num_experts, generator=gen, dtype=torch.float64)
        beta1[-1], beta0[-1] = 0.0, 0.0
        a = torch.randn(num_experts, dim, generator=gen, dtype=torch.float64)
        b = torch.randn(num_experts, generator=gen, dtype=torch.float64)
        s = torch.full((num_experts,), float(sigma), dtype=torch.float64)
        tensors = (t.to(dtype) for t in (beta1, beta0, a, b, s))
        return cls(*tensors, temperature, top_k, activation)

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """Gate probabilities [N, num_experts] for inputs [N, dim]."""
        logits = x @ self.beta1.T
        if self.activation is not None:
            act = GATE_ACTIVATIONS[self.activation]
            return torch.softmax(act(logits + self.beta0) / self.temperature, dim=1)
        if self.top_k is not None and self.top_k < self.num_experts:
            kth = logits.topk(self.top_k, dim=1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.softmax((logits + self.beta0) / self.temperature, dim=1)

    def log_prob(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log p(y | x) [N] of targets [N] given inputs [N, dim]."""
        mean = x @ self.a.T + self.b
        comp = -0.5 * ((y[:, None] - mean) / self.sigma) ** 2 - torch.log(
            self.sigma * math.sqrt(2 * math.pi)
        )
        return torch.logsumexp(torch.log(self.gate(x)) + comp, dim=1)


@dataclass
class GaussianMoEData:
    """x [N, dim], y [N], experts int64 [N] (the latent expert of each sample), params."""

    x: torch.Tensor
    y: torch.Tensor
    experts: torch.Tensor
    params: GaussianMoEParams


def gaussian_moe(
    num_samples: int,
    *,
    dim: int = 1,
    num_experts: int = 2,
    params: GaussianMoEParams | None = None,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    activation: str | None = None,
) -> GaussianMoEData:
    """Samples X ~ N(0, I_dim), expert i ~ G(X), Y ~ N(a_i^T X + b_i, sigma_i^2).

    Without ``params``, true parameters come from ``GaussianMoEParams.random(dim,
    num_experts, seed=seed, temperature=temperature, top_k=top_k, activation=activation)``;
    with them, ``dim``, ``num_experts``, ``temperature``, ``top_k`` and ``activation`` are
    the params'. To draw several samples
    of one ground truth, build the params once and vary ``seed``.
    """
    if params is None:
        params = GaussianMoEParams.random(
            dim,
            num_experts,
            seed=seed,
            temperature=temperature,
            top_k=top_k,
            dtype=dtype,
            activation=activation,
        )
    gen = torch.Generator().manual_seed(seed)
    p = params
    x = torch.randn(num_samples, p.dim, generator=gen, dtype=torch.float64).to(p.a.dtype)
    gate = p.gate(x)
    if num_samples:
        experts = torch.multinomial(gate.double(), 1, generator=gen).squeeze(1)
    else:
        experts = torch.zeros(0, dtype=torch.int64)
    eps = torch.randn(num_samples, generator=gen, dtype=torch.float64).to(p.a.dtype)
    y = (x * p.a[experts]).sum(1) + p.b[experts] + p.sigma[experts] * eps
    return GaussianMoEData(x, y, experts, params)


# -- MMoE synthetic multi-task data ---------------------------------------------------------


@dataclass
class MMoEData:
    """x [N, dim], y [N, 2] (one column per task), and the generating parameters."""

    x: torch.Tensor
    y: torch.Tensor
    weights: torch.Tensor  # [2, dim]: w1, w2
    alpha: torch.Tensor  # [num_sin]
    beta: torch.Tensor  # [num_sin]
    correlation: float


def mmoe_synthetic(
    num_samples: int,
    *,
    correlation: float,
    dim: int = 100,
    scale: float = 1.0,
    num_sin: int = 10,
    noise_std: float = 0.1,
    seed: int = 0,
) -> MMoEData:
    """Two regression tasks of controlled relatedness (Ma et al., KDD 2018, "Modeling Task
    Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts", section 4).

    u1, u2: orthonormal (QR of a Gaussian [dim, 2]); w1 = c u1,
    w2 = c (p u1 + sqrt(1 - p^2) u2) with c = ``scale``, p = ``correlation``; x ~ N(0, I);
    y_i = w_i^T x + sum_j sin(alpha_j w_i^T x + beta_j) + eps_i, alpha and beta shared by the
    tasks. The cosine of w1 and w2 is p, and the Pearson correlation of y1 and y2 grows with
    p (it is not p exactly, because of the sines).

    Choices where the paper is not specific: alpha_j, beta_j ~ N(0, 1); the paper's noise
    N(0, 0.01) is read as a variance, so ``noise_std = 0.1``; ``dim = 100``, ``scale = 1``,
    ``num_sin = 10`` are our defaults. u1, u2, alpha, beta and x depend on ``seed`` only, so
    datasets with the same seed and different ``correlation`` are paired.
    """
    if not -1 <= correlation <= 1:
        raise ValueError(f"correlation must be in [-1, 1], got {correlation}")
    if dim < 2:
        raise ValueError(f"dim must be >= 2 for two orthogonal directions, got {dim}")
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(dim, 2, generator=gen, dtype=torch.float64))
    u1, u2 = u[:, 0], u[:, 1]
    alpha = torch.randn(num_sin, generator=gen, dtype=torch.float64)
    beta = torch.randn(num_sin, generator=gen, dtype=torch.float64)
    x = torch.randn(num_samples, dim, generator=gen, dtype=torch.float64)
    eps = noise_std * torch.randn(num_samples, 2, generator=gen, dtype=torch.float64)
    p = float(correlation)
    w = scale * torch.stack([u1, p * u1 + math.sqrt(1 - p * p) * u2])
    proj = x @ w.T  # [N, 2]
    y = proj + torch.sin(proj[:, :, None] * alpha + beta).sum(-1) + eps
    return MMoEData(x.float(), y.float(), w.float(), alpha.float(), beta.float(), p)
