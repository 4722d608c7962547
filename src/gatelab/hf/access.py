"""The HF transformers v5 adapter of the access layer (:mod:`gatelab.inspect.access`).

``gatelab.inspect.access.find_moe_blocks`` registers :class:`HFAdapter` the first time it
sees a transformers model (this module imports nothing from ``inspect``: the adapter is
duck-typed against ``MoEBlock`` and the per-block hook owner, ``BlockHooks`` in
:mod:`gatelab.inspect.access.hooks`, and follows ``BlockAdapter`` in
:mod:`gatelab.inspect.access.adapters`). It recognises an MoE block
by shape rather than by class name, so the six families below and others built the same
way are found:

- a module with an ``experts`` child holding 3-D ``gate_up_proj`` (or ``up_proj``) and
  ``down_proj`` parameters, and
- a ``gate`` (Mixtral, Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3) or ``router`` (GPT-OSS) child
  with a 2-D ``weight`` [E, D] and ``top_k``.

Routers return ``(router_logits, top_k_weights, top_k_index)``. Conversion to a Routing:

- ``logits``: router_logits as float32 (GPT-OSS's include its router bias);
- ``scores``: sigmoid(logits) for routers with ``e_score_correction_bias`` (DeepSeek-V3
  style, which rank sigmoid scores + bias), softmax(logits) otherwise (for GPT-OSS, which
  ranks raw logits, softmax keeps the order);
- ``experts``, ``weights``: top_k_index and top_k_weights as returned, never recomputed
  (DeepSeek's weights carry ``routed_scaling_factor`` and its choice the bias and groups);
  ids >= E (HF's expert-parallel sentinel) become EMPTY slots;
- ``aux["expert_bias"]``: DeepSeek's ``e_score_correction_bias``.

Back to HF, when an edit is active: EMPTY slots keep weight 0; their id is -1 when the
experts run on gatelab's implementation (``experts_implementation="gatelab"``, which
skips it), otherwise a *filler*: an expert the token does not use in another slot. HF's
eager loop skips the sentinel id E but GPT-OSS's eager one-hot has no class for it, and
grouped_mm/batched_mm clamp it only under expert parallelism, so a filler with weight 0
is the one id every implementation accepts; its output is multiplied by 0 (it costs that
expert's compute for the token, no more).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..experts import ExpertWeights
from ..layers import MoE
from ..routing import EMPTY, Routing
from .experts import IMPLEMENTATION, expert_weights_from_hf, register

_ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")


def _is_experts(module: nn.Module | None) -> bool:
    if module is None:
        return False
    w_in = getattr(module, "gate_up_proj", None)
    if w_in is None:
        w_in = getattr(module, "up_proj", None)
    w_out = getattr(module, "down_proj", None)
    return all(isinstance(w, Tensor) and w.dim() == 3 for w in (w_in, w_out))


def _router_of(module: nn.Module) -> nn.Module | None:
    for name in _ROUTER_NAMES:
        router = getattr(module, name, None)
        weight = getattr(router, "weight", None)
        if isinstance(router, nn.Module) and isinstance(weight, Tensor) and weight.dim() == 2:
            if hasattr(router, "top_k"):
                return router
    return None


def _family(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or "hf"


class HFAdapter:
    """Finds HF v5 MoE blocks, hooks their routers, reads their experts."""

    family = "hf"

    def find(self, model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
        family = _family(model)
        found = []
        for name, module in model.named_modules():
            if isinstance(module, MoE):  # gatelab's own layer: the gatelab adapter's
                continue
            experts = getattr(module, "experts", None)
            router = _router_of(module)
            if router is None or not _is_experts(experts):
                continue
            num_experts = router.weight.shape[0]
            found.append(
                (
                    name,
                    dict(
                        module=module,
                        router=router,
                        experts=experts,
                        num_experts=num_experts,
                        top_k=int(router.top_k),
                        has_shared=any(getattr(module, n, None) is not None for n in _SHARED_NAMES),
                        family=family,
                    ),
                )
            )
        return found

    def install(self, block, hooks) -> list[Any]:
        """A router forward hook passing each Routing through ``hooks.apply``."""

        def hook(module, args, output):
            routing = routing_from_hf(output, block)
            edited = hooks.apply(routing)
            if not hooks.editing:
                return None  # the router's own tensors go on untouched
            return routing_to_hf(edited, output, block)

        return [block.router.register_forward_hook(hook)]

    def expert_weights(self, block) -> ExpertWeights:
        return expert_weights_from_hf(block.experts)

    def restrict(self, block, allowed: Tensor):
        """The routing edit that makes the router choose among ``allowed`` experts only."""
        from .prune import restricted_routing

        return lambda routing: restricted_routing(block, routing, allowed)

    def prune(self, model: nn.Module, blocks, keep: dict[int, list[int]]) -> nn.Module:
        """A copy of ``model`` with only ``keep[layer]`` experts (see :mod:`gatelab.hf.prune`)."""
        from .prune import prune_hf_model

        return prune_hf_model(model, blocks, keep)


def routing_from_hf(output: tuple, block) -> Routing:
    """The Routing of an HF router's ``(router_logits, top_k_weights, top_k_index)``."""
    logits, weights, index = output[0], output[1], output[2]
    logits = logits.reshape(-1, logits.shape[-1]).float()
    bias = getattr(block.router, "e_score_correction_bias", None)
    scores = logits.sigmoid() if bias is not None else logits.softmax(dim=-1)
    experts = index.reshape(logits.shape[0], -1).long()
    weights = weights.reshape(experts.shape).float()
    off = experts >= block.num_experts
    if bool(off.any()):
        experts = experts.masked_fill(off, EMPTY)
        weights = weights.masked_fill(off, 0.0)
    aux = {"expert_bias": bias.detach()} if bias is not None else {}
    return Routing(logits, scores, experts, weights, aux, check=False)


def routing_to_hf(routing: Routing, output: tuple, block) -> tuple:
    """An HF router output carrying ``routing`` (EMPTY slots handled as the module says)."""
    logits, weights, index = output[0], output[1], output[2]
    experts = routing.experts
    if _implementation(block) != IMPLEMENTATION:
        experts = fill_empty_slots(experts, block.num_experts)
    new = (
        routing.logits.to(logits.dtype).reshape(logits.shape),
        routing.weights.to(weights.dtype),
        experts.to(index.dtype),
    )
    return new + tuple(output[3:])


def _implementation(block) -> str | None:
    config = getattr(block.experts, "config", None)
    return getattr(config, "_experts_implementation", None)


def fill_empty_slots(experts: Tensor, num_experts: int) -> Tensor:
    """Replace EMPTY ids by experts the token uses in no other slot (for weight-0 slots).

    The j-th empty slot of a row gets the j-th unused expert id of that row, so no row
    names an expert twice (while K <= E; past that, ids repeat with weight 0).
    """
    empty = experts == EMPTY
    if not bool(empty.any()):
        return experts
    t, _ = experts.shape
    used = torch.zeros(t, num_experts + 1, dtype=torch.bool, device=experts.device)
    used.scatter_(1, torch.where(empty, num_experts, experts), True)
    unused_first = torch.argsort(used[:, :num_experts].to(torch.int8), dim=1, stable=True)
    rank = (empty.long().cumsum(dim=1) - 1).clamp(0, num_experts - 1)
    filler = unused_first.gather(1, rank)
    return torch.where(empty, filler, experts)


# -- loading -----------------------------------------------------------------------------------


def is_hf_directory(path: str | os.PathLike) -> bool:
    """True for a directory holding an HF ``config.json`` with a ``model_type``."""
    import json

    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        return "model_type" in json.loads(config.read_text())
    except (OSError, ValueError):
        return False


def load_pretrained(
    path: str | os.PathLike, experts_implementation: str = IMPLEMENTATION, dtype=torch.float32
) -> nn.Module:
    """Load a local HF causal-LM checkpoint for inspection and editing (eval mode).

    ``experts_implementation`` defaults to gatelab's (registered here), which skips EMPTY
    slots; pass "eager" for HF's reference loop.
    """
    from transformers import AutoModelForCausalLM

    if not is_hf_directory(path):
        raise FileNotFoundError(
            f"{path} is not an HF model directory (no config.json with a model_type); "
            "give the directory save_pretrained wrote"
        )
    if experts_implementation == IMPLEMENTATION:
        register()
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, experts_implementation=experts_implementation
    )
    return model.eval()


__all__ = [
    "HFAdapter",
    "fill_empty_slots",
    "is_hf_directory",
    "load_pretrained",
    "routing_from_hf",
    "routing_to_hf",
]
