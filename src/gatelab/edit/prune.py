"""Task-specific expert pruning from a few demonstrations.

Implements EASY-EP (Dong et al., "Domain-Specific Pruning of Large Mixture-of-Experts
Models with Few-shot Demonstrations", NeurIPS 2025, arXiv 2504.06792; code
``RUCAIBox/EASYEP``): in one forward pass over in-domain demonstrations, score each expert
of each layer by

- output-aware importance c_{i,t} = g_{i,t} * ||E_i(h_t)||_2 (gate weight times the norm
  of the expert's own output), counted for the experts a token is routed to,
- weighted by the token's contribution w_t = max(1 - cos(h_t, h_t + RoutedMoE(x_t)), 0),
  the change the routed experts (not the shared expert) make to the residual stream,

S_i = sum over demonstrations and tokens of w_t * c_{i,t}; keep the top N per layer. The
``frequency`` baseline counts routed slots instead (the usual count-based pruning).

Which hidden state: the reference (``pruning/model_new.py``, ``Block.forward``, whose
``simibr`` ``pruning/expert_selection.py`` reads) compares the **un-normalised residual
stream** h_t entering the MoE sublayer with h_t plus the routed output; the experts
themselves run on x_t = ffn_norm(h_t). That is the default (``contribution="residual"``;
the access layer captures h_t with ``capture_routing(..., stream=True)``). Departure kept
as an option: ``contribution="ffn_input"`` compares x_t with x_t + RoutedMoE(x_t), the
reading of the notes this module followed before (issue 15); it needs no residual stream,
so it also works on a bare MoE block. EASY-EP uses the 25 longest demonstrations: pass the
demonstrations you want scored.

Grouped routers (DeepSeek-V3's ``n_group``): each group keeps N / n_group experts, so the
pruned router's groups are the original groups restricted to their kept experts and its
choices equal the masked original's (the paper prunes DeepSeek globally; the group rule
then changes what the pruned router can choose, which this avoids).

The *masked original* (:func:`restrict_experts`) is the unpruned model whose router chooses
among the kept experts only; :func:`prune_model` builds the physically smaller model
(router rows and expert tensors removed, config updated), whose outputs equal it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inspect.access import (
    EditHandle,
    MoEBlock,
    capture_routing,
    edit_routing,
    find_moe_blocks,
    has_hooks,
    select_blocks,
)
from ..inspect.prompts import forward_ids, prompt_batches

METHODS = ("easy_ep", "frequency")
CONTRIBUTIONS = ("residual", "ffn_input")


def expert_importance(
    model,
    prompts: Iterable,
    method: str = "easy_ep",
    layers: Iterable[int] | None = None,
    contribution: str = "residual",
) -> dict[int, Tensor]:
    """Per MoE layer, an [E] float64 importance of each expert on ``prompts`` (token ids).

    ``contribution`` (EASY-EP only): which hidden state the token weight compares with
    itself plus the routed output, the residual stream (the reference) or the normalised
    block input (see the module doc).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if contribution not in CONTRIBUTIONS:
        raise ValueError(f"contribution must be one of {CONTRIBUTIONS}, got {contribution!r}")
    blocks = select_blocks(model, layers)
    batches = prompt_batches(model, prompts, "demonstrations")
    scores = {b.layer: torch.zeros(b.num_experts, dtype=torch.float64) for b in blocks}
    easy = method == "easy_ep"
    stream = easy and contribution == "residual"
    with capture_routing(blocks, hidden=easy, stream=stream) as cap:
        for ids in batches:
            cap.clear()
            forward_ids(model, ids)
            for block in blocks:
                routing = cap.routing(block.layer)
                if not easy:
                    scores[block.layer] += routing.tokens_per_expert().double().cpu()
                    continue
                x = cap.input(block.layer)
                h = cap.stream(block.layer) if stream else x
                scores[block.layer] += _easy_ep(block, x, h, routing)
    return scores


@torch.no_grad()
def _easy_ep(block: MoEBlock, x: Tensor, h: Tensor, routing) -> Tensor:
    """Scores of one batch: the experts run on ``x``; the token weight compares ``h`` with
    ``h`` + the routed output."""
    weights = block.expert_weights()
    x = x.to(weights.w_in.dtype)
    if h.shape != x.shape:
        raise ValueError(
            f"layer {block.layer}: the residual stream has shape {tuple(h.shape)} but the "
            f"block input {tuple(x.shape)}; this block does not read the stream token by token"
        )
    h = h.to(weights.w_in.dtype)
    routed = torch.zeros_like(x)
    per_slot = torch.zeros(routing.experts.shape, dtype=torch.float64)  # c_{i,t} per slot
    for e in range(block.num_experts):
        tokens, slots = (routing.experts == e).nonzero(as_tuple=True)
        if tokens.numel() == 0:
            continue
        hidden = x[tokens] @ weights.w_in[e].T
        if weights.b_in is not None:
            hidden = hidden + weights.b_in[e]
        out = weights.activate(hidden) @ weights.w_out[e].T
        if weights.b_out is not None:
            out = out + weights.b_out[e]
        gate = routing.weights[tokens, slots].to(out.dtype)
        routed.index_add_(0, tokens, out * gate[:, None])
        per_slot[tokens.cpu(), slots.cpu()] = (gate * out.norm(dim=1)).double().cpu()
    contribution = (1 - F.cosine_similarity(h, h + routed, dim=1)).clamp_min(0).double().cpu()
    weighted = per_slot * contribution[:, None]
    index = routing.experts.cpu().clamp_min(0)
    return torch.zeros(block.num_experts + 1, dtype=torch.float64).index_add_(
        0,
        torch.where(routing.valid.cpu(), index, block.num_experts).reshape(-1),
        weighted.reshape(-1),
    )[: block.num_experts]


def _groups(block: MoEBlock) -> tuple[int, int]:
    router = block.router
    groups = getattr(router, "num_group", None) or getattr(router, "n_group", None) or 1
    return int(groups), int(getattr(router, "topk_group", 1) or 1)


def check_keep(block: MoEBlock, keep: int) -> None:
    """Raise a ValueError unless ``keep`` experts can serve the block's routing."""
    if not isinstance(keep, int) or isinstance(keep, bool):
        raise TypeError(f"keep must be an int, got {type(keep).__name__}")
    if keep > block.num_experts:
        raise ValueError(
            f"keep={keep} exceeds the {block.num_experts} experts of layer {block.layer}"
        )
    if keep < block.top_k:
        raise ValueError(
            f"keep={keep} is below top_k={block.top_k} (layer {block.layer}): every token "
            f"needs {block.top_k} experts; keep at least {block.top_k}"
        )
    n_group, topk_group = _groups(block)
    if n_group > 1:
        per = keep // n_group
        if keep % n_group or per < 2 or per * topk_group < block.top_k:
            raise ValueError(
                f"layer {block.layer} routes in {n_group} groups (top {topk_group}): keep must "
                f"be a multiple of {n_group} with keep/{n_group} >= 2 and "
                f"keep/{n_group} * {topk_group} >= top_k={block.top_k}; got keep={keep}"
            )


def select_experts(model, importance: Mapping[int, Tensor], keep: int) -> dict[int, list[int]]:
    """The ``keep`` most important experts of each layer (sorted ids); per group for
    grouped routers (see the module doc)."""
    blocks = select_blocks(model, list(importance))
    chosen = {}
    for block in blocks:
        check_keep(block, keep)
        score = torch.as_tensor(importance[block.layer], dtype=torch.float64)
        if score.shape != (block.num_experts,):
            raise ValueError(
                f"importance for layer {block.layer} must have shape [{block.num_experts}]"
            )
        if not bool(torch.isfinite(score).all()):  # topk would rank NaN first, silently
            raise ValueError(
                f"importance for layer {block.layer} has non-finite values "
                f"{score[~torch.isfinite(score)].tolist()}; recompute it on finite model outputs"
            )
        n_group, _ = _groups(block)
        size = block.num_experts // n_group
        ids = []
        for g in range(n_group):
            best = score[g * size : (g + 1) * size].topk(keep // n_group).indices + g * size
            ids += best.tolist()
        chosen[block.layer] = sorted(ids)
    return chosen


def _allowed(block: MoEBlock, ids: Sequence[int]) -> Tensor:
    mask = torch.zeros(block.num_experts, dtype=torch.bool)
    mask[torch.as_tensor(list(ids), dtype=torch.long)] = True
    return mask


def restrict_experts(model, keep: Mapping[int, Sequence[int]]) -> EditHandle:
    """The masked original: the router of each layer chooses among ``keep[layer]`` only
    (its own rule on its logits; see the adapters' ``restrict``). Returns the undo handle."""
    blocks = select_blocks(model, list(keep))
    edits = {}
    for block in blocks:
        check_keep(block, len(keep[block.layer]))
        edits[block.layer] = block.adapter.restrict(block, _allowed(block, keep[block.layer]))
    return edit_routing(model, edits)


def prune_model(model: nn.Module, keep: Mapping[int, Sequence[int]]) -> nn.Module:
    """A physically smaller copy of ``model`` keeping ``keep[layer]`` experts in every MoE
    layer (the same count everywhere: configs hold one expert count). HF models keep their
    class and save with ``save_pretrained``; gatelab models are rebuilt from their config."""
    blocks = find_moe_blocks(model)
    missing = [b.layer for b in blocks if b.layer not in keep]
    if missing:
        raise ValueError(f"keep must list the kept experts of every MoE layer; missing {missing}")
    hooked = [b.layer for b in blocks if has_hooks(b)]
    if hooked:  # a copy would carry hooks that feed the original's captures and edits
        raise ValueError(
            f"layers {hooked} have captures or edits installed; remove them (leave their "
            "`with` blocks) before prune_model"
        )
    for block in blocks:
        ids = list(keep[block.layer])
        check_keep(block, len(ids))
        if len(set(ids)) != len(ids) or not all(0 <= int(e) < block.num_experts for e in ids):
            raise ValueError(f"layer {block.layer}: kept ids must be distinct and in range")
    return blocks[0].adapter.prune(model, blocks, {k: [int(e) for e in v] for k, v in keep.items()})


__all__ = [
    "CONTRIBUTIONS",
    "METHODS",
    "check_keep",
    "expert_importance",
    "prune_model",
    "restrict_experts",
    "select_experts",
]
