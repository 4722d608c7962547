"""Dopamine: adapt a frozen model by gating and rescaling its neurons, not by changing weights.

"Dopamine: Brain Modes, Not Brains" (Ghasemlou, arXiv 2602.11726). The base model's weights
stay frozen; every gated neuron i gets a threshold theta_i and a gain g_i (two trainable
numbers per neuron). During training a smooth gate decides how much of the activation a_i
takes part; at inference the gate is hardened to a step, so a neuron either fires (scaled)
or is switched off, which gives conditional computation and a neuron-level attribution::

    training:   y_i = g_i * sigmoid((a_i - theta_i) / T) * a_i
    inference:  y_i = g_i * 1[a_i > theta_i] * a_i

The paper's exact formula and temperature were not found (the notes mark the form above as
a plausible reading), so this module follows it and documents the choices:

- ``theta`` starts at 0 and ``g`` at 1. For a ReLU base the hardened gate is then the
  identity (``1[a > 0] * a = relu``), so an untrained adapter reproduces the frozen model
  exactly; the tests check this.
- ``T`` is a plain attribute (``temperature``), not learned; :func:`temperature_at`
  anneals it geometrically over training so that the smooth gate the model is trained
  with approaches the step it is evaluated with.
- The gate sits on the output of activation modules (``nn.ReLU`` etc.), found by name;
  the base is kept in eval mode (its dropout off) because it is frozen.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

# Modules whose output is a neuron's activation: the default gate sites.
ACTIVATION_MODULES = (nn.ReLU, nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Tanh)


class DopamineGate(nn.Module):
    """Per-neuron threshold and gain on activations [..., width] (see the module docstring).

    ``hard`` None follows the mode (smooth in training, step in eval); True / False force it.
    """

    def __init__(self, width: int, temperature: float = 0.1):
        super().__init__()
        if isinstance(width, bool) or not isinstance(width, int) or width < 1:
            raise ValueError(f"width must be a positive int, got {width!r}")
        self.width = width
        self.temperature = _check_temperature(temperature)
        self.hard: bool | None = None
        self.threshold = nn.Parameter(torch.zeros(width))
        self.gain = nn.Parameter(torch.ones(width))

    def extra_repr(self) -> str:
        return f"width={self.width}, temperature={self.temperature:g}"

    def is_hard(self) -> bool:
        return (not self.training) if self.hard is None else self.hard

    def gate(self, a: Tensor) -> Tensor:
        """The gate value in [0, 1] for activations ``a`` (a step when hard)."""
        if self.is_hard():
            return (a > self.threshold).to(a.dtype)
        return torch.sigmoid((a - self.threshold) / self.temperature)

    def forward(self, a: Tensor) -> Tensor:
        if a.shape[-1] != self.width:
            raise ValueError(
                f"DopamineGate expects activations [..., {self.width}], got {tuple(a.shape)}"
            )
        return self.gain * self.gate(a) * a


def _check_temperature(t: float) -> float:
    if not isinstance(t, int | float) or isinstance(t, bool) or not t > 0 or math.isinf(t):
        raise ValueError(f"temperature must be a finite number > 0, got {t!r}")
    return float(t)


def temperature_at(step: int, total_steps: int, start: float = 1.0, end: float = 0.05) -> float:
    """Geometric anneal from ``start`` (step 0) to ``end`` (the last step)."""
    _check_temperature(start)
    _check_temperature(end)
    if total_steps < 1 or not 0 <= step < max(total_steps, 1):
        raise ValueError(f"need 0 <= step < total_steps, got step={step}, total={total_steps}")
    frac = step / max(total_steps - 1, 1)
    return start * (end / start) ** frac


def activation_sites(model: nn.Module, kinds: tuple[type, ...] = ACTIVATION_MODULES) -> list[str]:
    """Names of the activation modules of ``model`` (the default gate sites)."""
    return [n for n, m in model.named_modules() if n and isinstance(m, kinds)]


class Dopamine(nn.Module):
    """A frozen model with a :class:`DopamineGate` on the output of each module in ``sites``.

    Args:
        model: the trained base; its parameters are frozen (``requires_grad=False``) and it
            stays in eval mode. Only the gates train.
        example: one input batch; a forward pass on it finds each site's width (the last
            dim of its output).
        sites: names of modules (``model.named_modules()``) whose outputs are gated; default
            every activation module (:func:`activation_sites`).
        temperature: the smooth gate's initial T.

    ``forward`` calls the base. ``trainable_parameters()`` gives the count per site;
    :meth:`open_fraction` the share of gated neurons that fire (hard gate) per site.
    """

    def __init__(
        self,
        model: nn.Module,
        example: Tensor,
        sites: Iterable[str] | None = None,
        temperature: float = 0.1,
    ):
        super().__init__()
        self.base = model
        self.sites = list(activation_sites(model) if sites is None else sites)
        if not self.sites:
            raise ValueError(
                "no gate sites: the model has no activation modules (nn.ReLU, nn.GELU, ...); "
                "pass sites=[names of modules whose outputs are neuron activations]"
            )
        modules = dict(model.named_modules())
        unknown = [s for s in self.sites if s not in modules or not s]
        if unknown:
            raise ValueError(
                f"sites {unknown} are not modules of the model; its modules are: "
                f"{', '.join(n for n in modules if n)}"
            )
        model.requires_grad_(False)
        widths = _site_widths(model, modules, self.sites, example)
        self.gates = nn.ModuleDict(
            {_key(s): DopamineGate(widths[s], temperature) for s in self.sites}
        )
        self._hooks = [modules[s].register_forward_hook(self._hook(_key(s))) for s in self.sites]
        self.record = False
        self.records: dict[str, list[Tensor]] = {}
        self.train(False)

    def _hook(self, key: str):
        def hook(module: nn.Module, inputs, output: Tensor) -> Tensor:
            gate = self.gates[key]
            if self.record:
                with torch.no_grad():
                    fired = gate.gate(output) * (output != 0) > 0
                    self.records.setdefault(key, []).append(fired.float().mean(0).flatten())
            return gate(output)

        return hook

    def train(self, mode: bool = True) -> Dopamine:
        super().train(mode)
        self.base.eval()  # frozen: its dropout and norms stay in inference mode
        return self

    def forward(self, *args, **kwargs):
        return self.base(*args, **kwargs)

    def set_temperature(self, temperature: float) -> None:
        for gate in self.gates.values():
            gate.temperature = _check_temperature(temperature)

    def set_hard(self, hard: bool | None) -> None:
        """Force the step (True), the smooth gate (False) or follow the mode (None)."""
        for gate in self.gates.values():
            gate.hard = hard

    def gate_parameters(self) -> list[nn.Parameter]:
        return list(self.gates.parameters())

    def trainable_parameters(self) -> dict[str, int]:
        """Trainable parameters per site (2 per neuron: threshold and gain)."""
        return {s: sum(p.numel() for p in self.gates[_key(s)].parameters()) for s in self.sites}

    def remove(self) -> nn.Module:
        """Take the hooks off and return the base model, unchanged."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        return self.base

    @torch.no_grad()
    def open_fraction(self, *args, **kwargs) -> dict[str, float]:
        """Per site: the share of (example, neuron) pairs whose gate fires on a nonzero
        activation, with the gate hard (inference). The model runs once on the inputs."""
        was_training, hard = self.training, [g.hard for g in self.gates.values()]
        self.eval()
        self.set_hard(True)
        self.record, self.records = True, {}
        try:
            self.base(*args, **kwargs)
        finally:
            self.record = False
            for gate, h in zip(self.gates.values(), hard, strict=True):
                gate.hard = h
            self.train(was_training)
        return {s: float(self.records[_key(s)][0].mean()) for s in self.sites}


def _key(site: str) -> str:
    return site.replace(".", "__")


@torch.no_grad()
def _site_widths(
    model: nn.Module, modules: dict[str, nn.Module], sites: list[str], example: Tensor
) -> dict[str, int]:
    widths: dict[str, int] = {}

    def probe(name):
        def hook(module, inputs, output):
            if not isinstance(output, Tensor) or output.dim() < 1:
                raise ValueError(f"site {name!r} does not return a tensor of activations")
            widths[name] = int(output.shape[-1])

        return hook

    hooks = [modules[s].register_forward_hook(probe(s)) for s in sites]
    was_training = model.training
    try:
        model.eval()
        model(example)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    missing = [s for s in sites if s not in widths]
    if missing:
        raise ValueError(f"sites {missing} did not run on the example input; gate modules it uses")
    return widths


def activation_fraction(model: nn.Module, x: Tensor, sites: Iterable[str]) -> dict[str, float]:
    """Per site: the share of (example, neuron) pairs with a nonzero activation, for the base
    model alone (the sparsity Dopamine's :meth:`Dopamine.open_fraction` is compared with)."""
    modules = dict(model.named_modules())
    out: dict[str, float] = {}

    def probe(name):
        def hook(module, inputs, output):
            out[name] = float((output != 0).float().mean())

        return hook

    hooks = [modules[s].register_forward_hook(probe(s)) for s in sites]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return out


__all__ = [
    "ACTIVATION_MODULES",
    "Dopamine",
    "DopamineGate",
    "activation_fraction",
    "activation_sites",
    "temperature_at",
]
