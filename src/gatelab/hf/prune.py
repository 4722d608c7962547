"""HF specifics of expert pruning: the router restricted to kept experts, and the surgery.

Used through :class:`gatelab.hf.access.HFAdapter` by :mod:`gatelab.edit.prune`.

:func:`restricted_routing` is the *masked original*: the router's own selection rule run on
its logits with the removed experts out of reach. It reproduces each family's rule (tested
against the routers with every expert allowed), so it equals what a physically pruned
router computes:

- softmax routers (Mixtral, Qwen2/Qwen3-MoE, OLMoE): softmax over the kept experts, top-k,
  renormalised when ``norm_topk_prob`` (Mixtral always);
- GPT-OSS (router with a bias and no ``norm_topk_prob``): top-k of the kept logits, softmax
  over those k;
- DeepSeek-V3 style (``e_score_correction_bias``): sigmoid scores, choice by score + bias
  among kept experts within the best ``topk_group`` of ``n_group`` groups (top-2 sum per
  group), weights = scores of the chosen, normalised when ``norm_topk_prob``, times
  ``routed_scaling_factor``.

:func:`prune_hf_model` removes the other experts from the experts' and router's [E, ...]
tensors and sets the config's expert count (``num_local_experts`` / ``num_experts`` /
``n_routed_experts``, whichever the config has), so ``save_pretrained`` writes a model
plain transformers loads.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from ..routing import Routing

EXPERT_COUNT_FIELDS = ("num_local_experts", "num_experts", "n_routed_experts")


def num_groups(router: nn.Module) -> tuple[int, int]:
    """(n_group, topk_group) of a grouped router; (1, 1) otherwise."""
    groups = getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1
    return int(groups), int(getattr(router, "topk_group", 1) or 1)


def restricted_routing(block, routing: Routing, allowed: Tensor) -> Routing:
    """The routing ``block``'s router gives when only ``allowed`` [E] experts exist."""
    router, k = block.router, block.top_k
    logits = routing.logits
    allowed = allowed.to(logits.device)
    bias = getattr(router, "e_score_correction_bias", None)
    if bias is not None:
        scores = logits.sigmoid()
        choice = (scores + bias.float()).masked_fill(~allowed, float("-inf"))
        n_group, topk_group = num_groups(router)
        if n_group > 1:
            grouped = choice.view(-1, n_group, choice.shape[1] // n_group)
            best = grouped.topk(2, dim=-1).values.sum(dim=-1).topk(topk_group, dim=-1).indices
            keep = torch.zeros(grouped.shape[:2], dtype=torch.bool, device=logits.device)
            keep.scatter_(1, best, True)
            choice = choice.masked_fill(~keep.repeat_interleave(grouped.shape[2], 1), -torch.inf)
        experts = choice.topk(k, dim=-1).indices
        weights = scores.gather(1, experts)
        if getattr(router, "norm_topk_prob", False):
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        weights = weights * router.routed_scaling_factor
    elif isinstance(getattr(router, "bias", None), Tensor) and not hasattr(
        router, "norm_topk_prob"
    ):  # GPT-OSS: top-k of the logits, softmax over the k chosen
        masked = logits.masked_fill(~allowed, float("-inf"))
        values, experts = masked.topk(k, dim=-1)
        weights = values.softmax(dim=-1)
        scores = masked.softmax(dim=-1)
    else:
        scores = logits.masked_fill(~allowed, float("-inf")).softmax(dim=-1)
        weights, experts = scores.topk(k, dim=-1)
        if getattr(router, "norm_topk_prob", True):
            weights = weights / weights.sum(dim=-1, keepdim=True)
    return routing.replace(scores=scores, experts=experts, weights=weights)


def _slice_expert_tensors(module: nn.Module, keep: Tensor, num_experts: int) -> None:
    """Cut every direct parameter/buffer of ``module`` whose first dim is E to ``keep``."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.dim() >= 1 and param.shape[0] == num_experts:
            new = nn.Parameter(param.detach()[keep].clone(), requires_grad=param.requires_grad)
            setattr(module, name, new)
    for name, buffer in list(module.named_buffers(recurse=False)):
        if buffer is not None and buffer.dim() >= 1 and buffer.shape[0] == num_experts:
            setattr(module, name, buffer[keep].clone())
    if hasattr(module, "num_experts"):
        module.num_experts = int(keep.numel())


def prune_hf_model(model: nn.Module, blocks, keep: dict[int, list[int]]) -> nn.Module:
    """A copy of ``model`` keeping ``keep[layer]`` experts in each MoE block (same count in
    every layer: the config holds one expert count)."""
    counts = {len(ids) for ids in keep.values()}
    if len(counts) != 1:
        raise ValueError(
            f"an HF config holds one expert count for all layers; keep the same number in "
            f"every layer (got {sorted(counts)})"
        )
    (count,) = counts
    pruned = copy.deepcopy(model)
    by_name = dict(pruned.named_modules())
    for block in blocks:
        ids = torch.tensor(sorted(keep[block.layer]), dtype=torch.long)
        module = by_name[block.name]
        for child in (module.experts, _router_child(module)):
            _slice_expert_tensors(child, ids, block.num_experts)
    config = pruned.config
    touched = [f for f in EXPERT_COUNT_FIELDS if hasattr(config, f)]
    if not touched:
        raise ValueError(
            f"{type(config).__name__} has none of {EXPERT_COUNT_FIELDS}; cannot record the "
            "pruned expert count"
        )
    for name in touched:
        setattr(config, name, count)
    return pruned


def _router_child(module: nn.Module) -> nn.Module:
    for name in ("gate", "router"):
        child = getattr(module, name, None)
        if isinstance(child, nn.Module) and hasattr(child, "top_k"):
            return child
    raise ValueError(f"{type(module).__name__} has no gate/router child")


__all__ = ["EXPERT_COUNT_FIELDS", "num_groups", "prune_hf_model", "restricted_routing"]
