"""gatelab's grouped dispatch as a transformers experts implementation.

HF v5 experts modules keep their weights fused in 3-D parameters and describe the layout
with flags set by ``@use_experts_implementation`` (``has_gate``, ``has_bias``,
``is_transposed``, ``has_post_expert_norm``). :func:`expert_weights_from_hf` reads those
into a :class:`~gatelab.experts.ExpertWeights` without copying; the forward registered by
:func:`register` runs :func:`~gatelab.dispatch.grouped_dispatch` on it.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import activations as hf_activations
from transformers.integrations import moe as hf_moe
from transformers.integrations.moe import ExpertsInterface

from ..dispatch import grouped_dispatch
from ..experts import GLU, ExpertWeights, Plain
from ..routing import EMPTY

IMPLEMENTATION = "gatelab"
"""The name to pass as ``experts_implementation`` after :func:`register`."""


def _unsupported(module: nn.Module, what: str) -> NotImplementedError:
    model = type(module).__name__
    config = getattr(module, "config", None)
    if config is not None and getattr(config, "model_type", None):
        model = f"{model} ({config.model_type})"
    return NotImplementedError(
        f"experts_implementation='gatelab' does not support {what}, used by {model}; "
        "load the model with experts_implementation='grouped_mm' instead"
    )


def expert_weights_from_hf(module: nn.Module) -> ExpertWeights:
    """View an HF v5 experts module's parameters as gatelab ``ExpertWeights``.

    Honours the module's ``has_gate`` (``gate_up_proj`` vs ``up_proj``), ``has_bias``
    (``*_bias`` parameters) and ``is_transposed`` ([E, in, out] storage, returned as a
    transposed view in gatelab's [E, out, in] layout) flags. Gated experts use the
    module's ``_apply_gate`` as the activation (this covers custom gates such as GPT-OSS's
    interleaved gate/up), plain experts its ``act_fn``. The returned tensors are the
    module's parameters (or views of them), so gradients flow back to the module.

    Raises:
        NotImplementedError: for experts with a post-expert norm or sharded for expert
            parallelism.
    """
    if getattr(module, "has_post_expert_norm", False):
        raise _unsupported(module, "experts with a post-expert norm (has_post_expert_norm)")
    if getattr(module, "_is_expert_parallel", False):
        raise _unsupported(module, "expert-parallel (sharded) experts")
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    in_name = "gate_up_proj" if has_gate else "up_proj"
    w_in, w_out = getattr(module, in_name), module.down_proj
    if getattr(module, "is_transposed", False):
        w_in, w_out = w_in.transpose(1, 2), w_out.transpose(1, 2)
    b_in = getattr(module, in_name + "_bias") if has_bias else None
    b_out = module.down_proj_bias if has_bias else None
    return ExpertWeights(w_in, w_out, b_in, b_out, _activation(module, has_gate)).check()


def _act_name(act_fn) -> str | None:
    """gatelab's name for an activation module or function that computes exactly one of
    gatelab's activations (same torch kernel); None for anything else.

    Matched by exact type, not isinstance: a subclass may override ``forward``.
    """
    kind = type(act_fn)
    if kind in (nn.SiLU, hf_activations.SiLUActivation) or act_fn is F.silu:
        return "silu"
    if kind is nn.ReLU or act_fn in (F.relu, torch.relu):
        return "relu"
    if kind is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(act_fn.approximate)
    if act_fn is F.gelu or (kind is hf_activations.GELUActivation and act_fn.act is F.gelu):
        return "gelu"
    inner = getattr(act_fn, "act", None) if kind is hf_activations.GELUTanh else None
    if isinstance(inner, functools.partial) and inner.func is F.gelu:
        return "gelu_tanh" if inner.keywords == {"approximate": "tanh"} else None
    return None


_WARNED: set[tuple[type, type]] = set()


def _activation(module: nn.Module, has_gate: bool):
    """The activation the experts module really computes (its ``act_fn``, not
    ``config.hidden_act``, which some families ignore: Aria's routed experts are always
    SiLU).

    gatelab's GLU/Plain (hand-written backward) when the module uses HF's default gate and
    an ``act_fn`` that maps exactly to a gatelab activation. A custom gate (GPT-OSS) is used
    as it is. An ``act_fn`` gatelab cannot map is not refused: the module's own callable
    runs inside gatelab's dispatch (differentiated by autograd), which is exact and only
    slower, with a one-time warning per experts class and activation class.
    """
    default_gate = getattr(type(module), "_apply_gate", None) is getattr(
        hf_moe, "_default_apply_gate", 0
    )
    if has_gate and not default_gate:
        return module._apply_gate
    act_fn = getattr(module, "act_fn", None)
    if not callable(act_fn):
        raise ValueError(
            f"experts_implementation='gatelab': {type(module).__name__} has no callable act_fn; "
            "load the model with experts_implementation='eager'"
        )
    name = _act_name(act_fn)
    if name is not None:
        return GLU(name) if has_gate else Plain(name)
    key = (type(module), type(act_fn))
    if key not in _WARNED:
        _WARNED.add(key)
        warnings.warn(
            f"experts_implementation='gatelab': {type(module).__name__}.act_fn "
            f"{type(act_fn).__name__} has no gatelab kernel; running it through autograd "
            "(exact, slower)",
            stacklevel=3,
        )
    return module._apply_gate if has_gate else act_fn


def gatelab_experts_forward(
    self: nn.Module, hidden_states: Tensor, top_k_index: Tensor, top_k_weights: Tensor
) -> Tensor:
    """The ``fn(self, hidden_states, top_k_index, top_k_weights)`` HF's interface calls.

    Expert ids ``>= num_experts`` (HF's expert-parallel sentinel) become empty slots.
    """
    bank = expert_weights_from_hf(self)
    off = top_k_index >= bank.num_experts
    experts = top_k_index.long().masked_fill(off, EMPTY)
    weights = top_k_weights.masked_fill(off, 0.0)
    out = grouped_dispatch(hidden_states, experts, weights, bank, deterministic=True)
    return out.to(hidden_states.dtype)


def register(name: str = IMPLEMENTATION) -> str:
    """Register gatelab's dispatch in transformers' ``ExpertsInterface`` (idempotent).

    Registration is global: afterwards ``from_pretrained(..., experts_implementation=name)``,
    ``from_config(..., experts_implementation=name)`` and
    ``model.set_experts_implementation(name)`` accept the name. Returns the name.
    """
    ExpertsInterface.register(name, gatelab_experts_forward)
    return name


__all__ = ["IMPLEMENTATION", "expert_weights_from_hf", "gatelab_experts_forward", "register"]
