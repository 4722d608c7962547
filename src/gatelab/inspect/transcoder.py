"""Transcoders: a wide, sparse ReLU MLP trained to replace one MLP or MoE layer.

Implements the transcoder of "Transcoders Find Interpretable LLM Feature Circuits"
(Dunefsky, Chlenski & Nanda, NeurIPS 2024, arXiv 2406.11944; code
``jacobdunefsky/transcoder_circuits``, ``SparseAutoencoder(is_transcoder=True)``)::

    f = ReLU((x - b_dec) W_enc + b_enc)       # x: the layer's input (after its norm)
    y_hat = f W_dec + b_dec_out               # y: the layer's output

trained on inputs and outputs rescaled to unit mean norm (the scales are folded back into
the parameters afterwards, so the l1 coefficient means the same for any layer's scale), with
the rows of ``W_dec`` kept at unit norm (the gradient component parallel to each row
is removed before every step and the rows renormalised after it), ``b_dec`` initialised to
the mean input and ``b_dec_out`` to the mean output. Loss, as in the code:
``mean_tokens[ ||y_hat - y||^2 / ||y|| ] + l1 * mean_tokens[ sum_i |f_i| ]``.

Departures: no ghost gradients and no resampling of dead features (short runs on small
models; the number of dead features is reported instead); Adam with a constant learning rate
and full-token-set minibatches rather than the paper's 60M-token schedule.

Evaluation (:func:`evaluate_transcoder`): L0 (mean active features per token), fraction of
variance explained ``1 - sum ||y - y_hat||^2 / sum ||y - mean(y)||^2``, and loss recovered
``(L_zero - L_transcoder) / (L_zero - L_clean)`` with the layer's output zero-ablated for
``L_zero`` (the paper's ``CE_loss_score``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .prompts import next_token_loss
from .readout import module_io


class Transcoder(nn.Module):
    """Sparse replacement of a layer: dim -> hidden_dim ReLU features -> dim_out.

    Args:
        dim: the layer's input width; hidden_dim: number of features; dim_out: output
            width (default dim).
    """

    def __init__(self, dim: int, hidden_dim: int, dim_out: int | None = None):
        super().__init__()
        for name, value in (("dim", dim), ("hidden_dim", hidden_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        dim_out = dim if dim_out is None else dim_out
        self.dim, self.hidden_dim, self.dim_out = dim, hidden_dim, dim_out
        self.W_enc = nn.Parameter(torch.empty(dim, hidden_dim))
        self.b_enc = nn.Parameter(torch.zeros(hidden_dim))
        self.W_dec = nn.Parameter(torch.empty(hidden_dim, dim_out))
        self.b_dec = nn.Parameter(torch.zeros(dim))
        self.b_dec_out = nn.Parameter(torch.zeros(dim_out))
        nn.init.kaiming_uniform_(self.W_enc)
        nn.init.kaiming_uniform_(self.W_dec)
        self.normalize_decoder()

    def encode(self, x: Tensor) -> Tensor:
        return torch.relu((x - self.b_dec) @ self.W_enc + self.b_enc)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [..., dim] -> (y_hat [..., dim_out], features [..., hidden_dim])."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"transcoder input must be [..., {self.dim}], got {tuple(x.shape)}")
        f = self.encode(x)
        return f @ self.W_dec + self.b_dec_out, f

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out of W_dec's gradient the part along each (unit) row."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad.sub_(parallel * self.W_dec)


def transcoder_loss(y_hat: Tensor, y: Tensor, f: Tensor, l1: float) -> tuple[Tensor, Tensor]:
    """(total loss, reconstruction term): the code's norm-scaled MSE plus l1 * sum |f|."""
    mse = ((y_hat - y) ** 2).sum(-1) / y.norm(dim=-1).clamp_min(1e-6)
    reconstruction = mse.mean()
    return reconstruction + l1 * f.abs().sum(-1).mean(), reconstruction


@dataclass
class TranscoderHistory:
    steps: int
    final_loss: float
    final_reconstruction: float


def train_transcoder(
    x: Tensor,
    y: Tensor,
    hidden_dim: int,
    l1: float = 1e-3,
    steps: int = 1000,
    lr: float = 1e-3,
    batch_size: int = 1024,
    seed: int = 0,
) -> tuple[Transcoder, TranscoderHistory]:
    """Train a transcoder mapping x [T, D] to y [T, D_out] (module doc)."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"x and y must be [tokens, dim] with the same (nonzero) token count, got "
            f"{tuple(x.shape)} and {tuple(y.shape)}"
        )
    if l1 < 0 or steps < 0 or batch_size < 1:
        raise ValueError(
            f"need l1 >= 0, steps >= 0, batch_size >= 1; got {l1}, {steps}, {batch_size}"
        )
    # Train in units where the mean input and output norms are 1 (layers often write
    # vectors far smaller than the residual stream they read), then fold the scales back.
    sx = x.norm(dim=1).mean().clamp_min(1e-12)
    sy = y.norm(dim=1).mean().clamp_min(1e-12)
    x, y = x / sx, y / sy
    torch.manual_seed(seed)
    tc = Transcoder(x.shape[1], hidden_dim, y.shape[1])
    with torch.no_grad():
        tc.b_dec.copy_(x.mean(0))
        tc.b_dec_out.copy_(y.mean(0))
    opt = torch.optim.Adam(tc.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    loss = reconstruction = torch.tensor(float("nan"))
    for _ in range(steps):
        idx = torch.randint(0, x.shape[0], (min(batch_size, x.shape[0]),), generator=g)
        y_hat, f = tc(x[idx])
        loss, reconstruction = transcoder_loss(y_hat, y[idx], f, l1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        tc.remove_parallel_grad()
        opt.step()
        tc.normalize_decoder()
    _fold_scales(tc, float(sx), float(sy))
    return tc.eval(), TranscoderHistory(steps, float(loss.detach()), float(reconstruction.detach()))


@torch.no_grad()
def _fold_scales(tc: Transcoder, sx: float, sy: float) -> None:
    """Make a transcoder trained on (x / sx, y / sy) act on x and produce y, keeping W_dec's
    rows unit-norm: features are multiplied by sy (f' = sy f), so W_enc and b_enc scale by
    sy (W_enc also by 1 / sx), b_dec by sx and b_dec_out by sy."""
    tc.W_enc.mul_(sy / sx)
    tc.b_enc.mul_(sy)
    tc.b_dec.mul_(sx)
    tc.b_dec_out.mul_(sy)


@contextmanager
def replaced(module: nn.Module, transcoder: Transcoder | None) -> Iterator[None]:
    """Within the block, ``module``'s output is the transcoder's reconstruction of it (or
    zeros when ``transcoder`` is None: the zero ablation)."""

    def hook(mod, args, kwargs, output):
        y = output[0] if isinstance(output, tuple) else output
        if transcoder is None:
            new = torch.zeros_like(y)
        else:
            x = args[0] if args else next(iter(kwargs.values()))
            new = transcoder(x.to(transcoder.W_enc.dtype))[0].to(y.dtype).reshape(y.shape)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def evaluate_transcoder(
    model: nn.Module, module: nn.Module, transcoder: Transcoder, prompts
) -> dict[str, float]:
    """L0, dead features, fraction of variance explained and loss recovered on ``prompts``."""
    x, y = module_io(model, module, prompts)
    with torch.no_grad():
        y_hat, f = transcoder(x)
    residual = ((y - y_hat) ** 2).sum()
    total = ((y - y.mean(0)) ** 2).sum().clamp_min(1e-12)
    clean = next_token_loss(model, prompts)
    with replaced(module, None):
        zero = next_token_loss(model, prompts)
    with replaced(module, transcoder):
        spliced = next_token_loss(model, prompts)
    gap = zero - clean
    return {
        "l0": float((f > 0).float().sum(-1).mean()),
        "dead_features": int(((f > 0).sum(0) == 0).sum()),
        "fve": float(1 - residual / total),
        "loss_clean": clean,
        "loss_zero_ablated": zero,
        "loss_transcoder": spliced,
        "loss_recovered": (zero - spliced) / gap if abs(gap) > 1e-12 else float("nan"),
    }


__all__ = [
    "Transcoder",
    "TranscoderHistory",
    "evaluate_transcoder",
    "replaced",
    "train_transcoder",
    "transcoder_loss",
]
