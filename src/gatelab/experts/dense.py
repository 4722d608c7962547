"""The one reader of a dense FFN into expert-bank layout.

:func:`read_dense_ffn` turns any dense two-layer FFN into :class:`ExpertWeights` of one
expert (E = 1), the layout an :class:`ExpertBank` stores: ``w_in`` [1, H, D] (H = 2F for a
GLU, gate rows first, then up rows), ``w_out`` [1, D, F], biases [1, H] / [1, D] or None.
Upcycling repeats that expert, UoE cuts it into slices of hidden units. FFNs understood:

- gatelab's dense-FFN family (``gatelab.layers.mlp``): a module with ``gate_up_proj`` and
  ``down_proj`` (:class:`~gatelab.layers.GluMlp`), or ``up_proj`` and ``down_proj``
  (:class:`~gatelab.layers.Mlp`), and its activation name in ``.act``;
- Hugging Face's gated MLPs (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``: LlamaMLP,
  Qwen2MLP, MistralMLP, ...) and their fused form (``gate_up_proj``, ``down_proj``,
  ``act_fn``: Phi-3);
- ``nn.Sequential(Linear, activation, Linear)`` (dropout and identity modules skipped).

An activation module or function is recognised by value on a probe grid, so anything
computing silu, gelu, gelu_tanh or relu works. Anything else raises
:class:`UnreadableFFNError` (a ``ValueError``; also a ``TypeError`` for the callers that
caught the old readers' TypeError).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from .activation import ACTIVATION_NAMES, GLU, Plain
from .bank import ExpertWeights

__all__ = ["UnreadableFFNError", "activation_name", "read_dense_ffn"]

# The order the probe tries them in (gelu before its tanh approximation).
_PROBE_ORDER = ("silu", "gelu", "gelu_tanh", "relu")


class UnreadableFFNError(ValueError, TypeError):
    """A module that :func:`read_dense_ffn` cannot read as a dense FFN."""


def activation_name(fn: Callable[[Tensor], Tensor]) -> str:
    """The gatelab activation that ``fn`` computes (checked by value on a probe grid)."""
    probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
    with torch.no_grad():
        try:
            got = fn(probe.float()).double()
        except Exception as error:  # noqa: BLE001 - any failure means "not an activation"
            raise UnreadableFFNError(f"could not evaluate the activation {fn!r}: {error}") from None
        for name in _PROBE_ORDER:
            if torch.allclose(got, Plain(name)(probe), atol=1e-5, rtol=1e-4):
                return name
    raise UnreadableFFNError(
        f"the FFN's activation {type(fn).__name__} ({fn!r}) is none of gatelab's expert "
        f"activations ({', '.join(_PROBE_ORDER)}); use an FFN with one of them"
    )


def read_dense_ffn(ffn: nn.Module) -> ExpertWeights:
    """``ffn`` as one expert in bank layout (see the module docstring). The tensors are the
    FFN's own (views, or a concatenation for HF's split gate/up), not detached copies."""
    if isinstance(ffn, nn.Sequential):
        return _sequential(ffn)
    down = getattr(ffn, "down_proj", None)
    if isinstance(down, nn.Linear):
        act = _family_act(ffn)
        for names in (("gate_up_proj",), ("gate_proj", "up_proj"), ("up_proj",)):
            parts = [getattr(ffn, n, None) for n in names]
            if all(isinstance(p, nn.Linear) for p in parts):
                return _weights(parts, down, act, glu=names != ("up_proj",))
    raise UnreadableFFNError(
        f"cannot read {type(ffn).__name__} as a dense FFN: expected gatelab's GluMlp "
        "(gate_up_proj, down_proj) or Mlp (up_proj, down_proj), an HF gated MLP (gate_proj, "
        "up_proj, down_proj, act_fn) or nn.Sequential(Linear, activation, Linear)"
    )


def _family_act(ffn: nn.Module) -> str:
    """The activation name: gatelab's family says it in ``.act``, HF's MLPs have ``act_fn``."""
    act = getattr(ffn, "act", None)
    if isinstance(act, str):
        if act not in ACTIVATION_NAMES:
            raise UnreadableFFNError(
                f"cannot read an FFN with act={act!r} into an expert bank; bank activations "
                f"are {', '.join(ACTIVATION_NAMES)}"
            )
        return act
    act_fn = getattr(ffn, "act_fn", None)
    if act_fn is None:
        raise UnreadableFFNError(
            f"{type(ffn).__name__} names no activation: expected .act (a gatelab activation "
            "name) or .act_fn (a module or function)"
        )
    return activation_name(act_fn)


def _sequential(ffn: nn.Sequential) -> ExpertWeights:
    parts = [m for m in ffn if not isinstance(m, nn.Dropout | nn.Identity)]
    if len(parts) != 3 or not (isinstance(parts[0], nn.Linear) and isinstance(parts[2], nn.Linear)):
        raise UnreadableFFNError(
            "an nn.Sequential FFN must be Linear, activation, Linear (dropout allowed), got "
            + ", ".join(type(m).__name__ for m in ffn)
        )
    up, act, down = parts
    return _weights([up], down, activation_name(act), glu=False)


def _weights(inputs: list[nn.Linear], down: nn.Linear, act: str, glu: bool) -> ExpertWeights:
    """[H, D] input rows (gate then up) and [D, F] output -> one expert [1, ...]."""
    biases = [p.bias for p in inputs]
    if any(b is None for b in biases) and any(b is not None for b in biases):
        raise UnreadableFFNError("gate_proj and up_proj must both have a bias or neither")
    w_in = torch.cat([p.weight for p in inputs]) if len(inputs) > 1 else inputs[0].weight
    b_in = None
    if biases[0] is not None:
        b_in = torch.cat(biases) if len(biases) > 1 else biases[0]
    b_out = None if down.bias is None else down.bias.unsqueeze(0)
    activate = GLU(act) if glu else Plain(act)
    return ExpertWeights(
        w_in.unsqueeze(0),
        down.weight.unsqueeze(0),
        None if b_in is None else b_in.unsqueeze(0),
        b_out,
        activate,
    ).check()
