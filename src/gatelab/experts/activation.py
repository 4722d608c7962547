"""Expert activations: [N, H] pre-activations -> [N, F], with forward and backward that
write into buffers the dispatcher owns.

The grouped dispatcher folds each slot's routing weight into the activation
(``scale * act(hidden)``) and runs its own backward, so an activation offers:

- ``__call__(hidden)``: the plain autograd-friendly function (the loop oracle uses it);
- ``forward_into(hidden, scale, out, keep)``: ``scale * act(hidden)``, into ``out`` when it
  can, leaving in ``keep`` what backward needs (e.g. act(gate) of a GLU);
- ``backward_into(hidden, scale, grad, grad_hidden, kept)``: given d loss / d output in
  ``grad``, write d loss / d hidden into ``grad_hidden`` and return d loss / d scale [N].

:class:`GLU` and :class:`Plain` cover the named activations with hand-written derivatives;
:class:`AutogradActivation` wraps any callable (HF's ``_apply_gate``, say) and differentiates
it with autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

_aten = torch.ops.aten

# name -> (function, forward into out, backward into grad_input)
_KERNELS: dict[str, tuple[Callable, Callable, Callable]] = {
    "silu": (
        F.silu,
        lambda x, out: _aten.silu.out(x, out=out),
        lambda g, x, out: _aten.silu_backward.grad_input(g, x, grad_input=out),
    ),
    "gelu": (
        F.gelu,
        lambda x, out: _aten.gelu.out(x, out=out),
        lambda g, x, out: _aten.gelu_backward.grad_input(g, x, grad_input=out),
    ),
    "gelu_tanh": (
        lambda x: F.gelu(x, approximate="tanh"),
        lambda x, out: _aten.gelu.out(x, approximate="tanh", out=out),
        lambda g, x, out: _aten.gelu_backward.grad_input(g, x, approximate="tanh", grad_input=out),
    ),
    "relu": (
        F.relu,
        lambda x, out: torch.clamp_min(x, 0, out=out),
        lambda g, x, out: _aten.threshold_backward.grad_input(g, x, 0, grad_input=out),
    ),
}

ACTIVATION_NAMES = tuple(sorted(_KERNELS))


def _kernels(name: str):
    if name not in _KERNELS:
        raise ValueError(f"unknown act {name!r}; valid names are: {', '.join(ACTIVATION_NAMES)}")
    return _KERNELS[name]


class ExpertActivation:
    """Base class; see the module docstring for the three methods."""

    def __call__(self, hidden: Tensor) -> Tensor:
        raise NotImplementedError

    def forward_into(self, hidden: Tensor, scale: Tensor, out: Tensor | None, keep=None) -> Tensor:
        """``scale * act(hidden)``; with ``keep`` [N, F], also leave there what
        ``backward_into`` needs, so backward does not compute it twice."""
        raise NotImplementedError

    def backward_into(self, hidden, scale, grad, grad_hidden, kept) -> Tensor:
        """Write d loss / d hidden into ``grad_hidden``; return d loss / d scale [N].

        ``kept`` is the ``keep`` buffer of a ``forward_into`` on the same inputs and must
        not be changed (a retained graph reads it again); ``grad`` may be overwritten.
        """
        raise NotImplementedError


class Plain(ExpertActivation):
    """act(hidden), F = H."""

    def __init__(self, name: str):
        self.name = name
        self.fn, self._forward, self._backward = _kernels(name)

    def __repr__(self) -> str:
        return f"Plain({self.name!r})"

    def __reduce__(self):
        # Rebuilt from the name: the kernel table holds lambdas, which pickle cannot name
        # (torch.save(model) and multiprocessing pickle whole modules).
        return (Plain, (self.name,))

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.fn(hidden)

    def forward_into(self, hidden, scale, out, keep=None):
        out = _empty_like(hidden) if out is None else out
        if keep is None:
            return self._forward(hidden, out).mul_(scale)
        return torch.mul(self._forward(hidden, keep), scale, out=out)

    def backward_into(self, hidden, scale, grad, grad_hidden, kept):
        # kept = act(hidden); grad_hidden is free scratch until the last line.
        grad_scale = torch.mul(kept, grad, out=grad_hidden).sum(dim=1)
        self._backward(grad.mul_(scale), hidden, grad_hidden)
        return grad_scale


class GLU(ExpertActivation):
    """act(gate) * up for hidden laid out [gate | up] (HF v5's concatenated gate_up), F = H/2."""

    def __init__(self, name: str):
        self.name = name
        self.fn, self._forward, self._backward = _kernels(name)

    def __repr__(self) -> str:
        return f"GLU({self.name!r})"

    def __reduce__(self):
        # Rebuilt from the name: the kernel table holds lambdas, which pickle cannot name
        # (torch.save(model) and multiprocessing pickle whole modules).
        return (GLU, (self.name,))

    def __call__(self, hidden: Tensor) -> Tensor:
        gate, up = hidden.chunk(2, dim=-1)
        return self.fn(gate) * up

    def forward_into(self, hidden, scale, out, keep=None):
        gate, up = hidden.chunk(2, dim=-1)
        out = _empty_like(gate) if out is None else out
        if keep is None:
            return self._forward(gate, out).mul_(up).mul_(scale)
        return torch.mul(self._forward(gate, keep), up, out=out).mul_(scale)

    def backward_into(self, hidden, scale, grad, grad_hidden, kept):
        gate, up = hidden.chunk(2, dim=-1)
        if torch.compiler.is_compiling():
            # Dynamo refuses out= into the non-contiguous halves: whole tensors, one write.
            grad_up = grad * kept
            grad_gate = self._backward(grad * scale * up, gate, _empty_like(gate))
            torch.cat([grad_gate, grad_up * scale], dim=1, out=grad_hidden)
            return (grad_up * up).sum(dim=1)
        grad_gate, grad_up = grad_hidden.chunk(2, dim=-1)
        torch.mul(grad, kept, out=grad_up)  # grad * act(gate), scaled below
        # d loss / d scale = sum_f grad * act(gate) * up (grad_gate is free scratch until the end).
        grad_scale = torch.mul(grad_up, up, out=grad_gate).sum(dim=1)
        grad_up.mul_(scale)
        self._backward(grad.mul_(scale).mul_(up), gate, grad_gate)
        return grad_scale


class AutogradActivation(ExpertActivation):
    """Any callable [N, H] -> [N, F], differentiated by autograd (a recompute in backward)."""

    def __init__(self, fn: Callable[[Tensor], Tensor]):
        self.fn = fn

    def __repr__(self) -> str:
        return f"AutogradActivation({self.fn!r})"

    def __call__(self, hidden: Tensor) -> Tensor:
        return self.fn(hidden)

    def forward_into(self, hidden, scale, out, keep=None):
        act = self.fn(hidden)
        # Scale in place only a fresh result, never hidden itself (backward reads it).
        # Under torch.compile there are no addresses to compare (a graph break), and
        # in-place buys nothing: the functional product.
        if torch.compiler.is_compiling() or act.data_ptr() == hidden.data_ptr():
            return act * scale
        return act.mul_(scale)

    def backward_into(self, hidden, scale, grad, grad_hidden, kept):
        if torch.compiler.is_compiling():  # dynamo does not trace autograd.grad; func.vjp
            act, vjp = torch.func.vjp(self.fn, hidden)
            (result,) = vjp(grad * scale)
            grad_hidden.copy_(result)
            return (grad * act).sum(dim=1)
        with torch.enable_grad():
            leaf = hidden.detach().requires_grad_()
            act = self.fn(leaf)
        grad_scale = (grad * act.detach()).sum(dim=1)
        (result,) = torch.autograd.grad(act, leaf, grad.mul_(scale))
        grad_hidden.copy_(result)
        return grad_scale


def as_activation(activate) -> ExpertActivation:
    """An ExpertActivation from one, or from any callable."""
    return activate if isinstance(activate, ExpertActivation) else AutogradActivation(activate)


def _empty_like(t: Tensor) -> Tensor:
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)
