"""Dense -> MoE: copy a trained FFN into E experts, diversify them, upcycle a whole LM.

Three steps, usable alone or as EvoMoE's pipeline (train one dense expert, spawn diverse
experts from it, train on with the dense-to-sparse gate)::

    moe = upcycle_ffn(ffn, num_experts=4, top_k=2)          # one FFN -> MoE of copies
    diversify_experts(moe, drop=0.5, seed=0)                # random unit masks per expert
    moe_lm = upcycle_lm(dense_lm, num_experts=4, top_k=4,   # every FFN of an LM
                        router="dense_to_sparse", diversify=0.5)

FFNs understood: whatever :func:`gatelab.experts.read_dense_ffn` reads (gatelab's dense-FFN
family, Hugging Face's gated MLPs, ``nn.Sequential(Linear, activation, Linear)``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..experts import ExpertBank, ExpertWeights, read_dense_ffn
from ..layers import MoE
from ..models.lm import LM

# -- one FFN -> MoE ------------------------------------------------------------------------


def upcycle_ffn(
    ffn: nn.Module | ExpertWeights,
    num_experts: int,
    top_k: int = 1,
    router: str | nn.Module = "topk",
    router_std: float | None = 0.02,
    router_kwargs: dict[str, Any] | None = None,
    **moe_kwargs: Any,
) -> MoE:
    """A gatelab ``MoE`` whose ``num_experts`` experts are copies of a trained dense FFN.

    "Sparse Upcycling: Training Mixture-of-Experts from Dense Checkpoints" (Komatsuzaki et
    al., arXiv 2212.05055) copies the dense MLP into every expert and trains a new router.
    With identical experts the layer computes sum_k w_k ffn(x) = ffn(x) whenever a token's
    combine weights sum to 1 (a normalised top-k, or a dense softmax over all experts);
    un-normalised weights scale the output by their sum.

    Router initialisation: weight ~ N(0, ``router_std``) (0.02: gatelab's LM init, logits
    near 0, so routing starts near uniform and the copies are mixed evenly); ``None`` keeps
    the router's own init; 0 gives exactly uniform scores. Other routers' parameters (biases)
    keep their init. ``moe_kwargs`` go to :class:`~gatelab.layers.MoE` (``dispatcher``,
    ``loss_weights``, ``capacity_factor``, ...).
    """
    dense = ffn if isinstance(ffn, ExpertWeights) else read_dense_ffn(ffn)
    if "experts" in moe_kwargs or "act" in moe_kwargs or "bias" in moe_kwargs:
        raise ValueError("experts, act and bias come from the dense FFN; do not pass them")
    bank = ExpertBank(
        num_experts,
        dense.dim,
        dense.hidden_dim,
        act=dense.act,
        glu=dense.glu,
        bias=dense.b_in is not None or dense.b_out is not None,
    ).to(dense.w_in.dtype)
    copy_into_bank(bank, dense)
    moe = MoE(
        dense.dim,
        dense.hidden_dim,
        num_experts,
        top_k,
        router=router,
        experts=bank,
        router_kwargs=router_kwargs,
        **moe_kwargs,
    ).to(dense.w_in.device)
    init_router(moe.router, router_std)
    return moe


@torch.no_grad()
def copy_into_bank(bank: ExpertBank, dense: ExpertWeights) -> None:
    """Write the dense FFN (one expert, :func:`~gatelab.experts.read_dense_ffn`) into every
    expert of ``bank`` (missing biases become 0)."""
    w = bank.weights()
    if w.w_in.shape[1:] != dense.w_in.shape[1:] or w.w_out.shape[1:] != dense.w_out.shape[1:]:
        raise ValueError(
            f"the bank's experts are [{tuple(w.w_in.shape[1:])}, {tuple(w.w_out.shape[1:])}], "
            f"the dense FFN is [{tuple(dense.w_in.shape[1:])}, {tuple(dense.w_out.shape[1:])}]"
        )
    w.w_in.copy_(dense.w_in.expand_as(w.w_in))
    w.w_out.copy_(dense.w_out.expand_as(w.w_out))
    for target, source in ((w.b_in, dense.b_in), (w.b_out, dense.b_out)):
        if target is not None:
            target.copy_(source.expand_as(target) if source is not None else 0.0)


@torch.no_grad()
def init_router(router: nn.Module, std: float | None) -> None:
    """Router weight ~ N(0, std); ``None`` leaves it as built."""
    if std is None:
        return
    if std < 0:
        raise ValueError(f"router_std must be >= 0 or None, got {std}")
    weight = getattr(router, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return  # nothing learned to initialise (hash routing)
    if std > 0:
        nn.init.normal_(weight, 0.0, std)
    else:
        weight.zero_()


# -- expert diversify ------------------------------------------------------------------------


@torch.no_grad()
def diversify_experts(
    moe: MoE | ExpertBank, drop: float = 0.5, rescale: bool = True, seed: int = 0
) -> Tensor:
    """EvoMoE's expert-diversify step: make the E copies of one trained expert differ.

    "EvoMoE: An Evolutional Mixture-of-Experts Training Framework via Dense-To-Sparse Gate"
    (Nie et al., arXiv 2112.14397) spawns diverse experts from the trained base expert by
    random masking; the released code does not show the rule. **The rule chosen here:**
    each expert keeps a random ``1 - drop`` share of the hidden units (exactly
    round((1 - drop) F) of them, drawn independently per expert); the output weights
    (``down_proj`` columns) of the other units are zeroed, and with ``rescale`` the kept
    columns are multiplied by F / kept. Why:

    - the FFN output is linear in the ``down_proj`` columns, so with the rescaling each
      expert equals the trained expert in expectation over its mask (inverted dropout on
      hidden units), while masking input weights would shift the activation's input and
      bias the result non-linearly;
    - the input weights stay, so a masked unit still computes its activation h_j, its
      output column gets gradient h_j * delta, and the expert can regrow to full width:
      diversity comes from where each expert starts, not from a permanent shrink;
    - exact shares keep every expert the same size (no expert loses all units).

    ``drop`` = 0 leaves the copies identical. Returns the [E, F] bool mask of kept units.
    """
    if not 0.0 <= drop < 1.0:
        raise ValueError(f"drop must lie in [0, 1), got {drop}")
    bank = moe.experts if isinstance(moe, MoE) else moe
    down = bank.down_proj  # [E, D, F]
    e, _, f = down.shape
    kept = max(1, round((1.0 - drop) * f))
    generator = torch.Generator().manual_seed(seed)
    order = torch.argsort(torch.rand(e, f, generator=generator), dim=1)
    mask = torch.zeros(e, f, dtype=torch.bool)
    mask.scatter_(1, order[:, :kept], True)
    scale = f / kept if rescale else 1.0
    down.mul_(mask.to(down.device, down.dtype).unsqueeze(1) * scale)
    return mask


# -- a whole LM ------------------------------------------------------------------------------


@torch.no_grad()
def upcycle_lm(
    lm: LM,
    num_experts: int,
    top_k: int = 1,
    router: str = "topk",
    router_kwargs: dict[str, Any] | None = None,
    router_std: float | None = 0.02,
    diversify: float | None = None,
    rescale: bool = True,
    seed: int = 0,
    **config_changes: Any,
) -> LM:
    """A new gatelab ``LM`` whose dense FFNs are MoE layers of copies (every layer).

    The new config is ``lm.config`` with ``moe_layers="all"``, ``expert_hidden_dim`` =
    the dense ``ffn_hidden_dim``, the given router settings and ``config_changes`` (e.g.
    ``loss_weights``, ``capacity_factor``), so checkpoints and recipes rebuild it. Every
    non-FFN tensor (embedding, attention, norms) is copied; each layer's FFN goes into all
    of its experts (:func:`upcycle_ffn`'s rule, router ~ N(0, ``router_std``)); with
    ``diversify`` (a drop share) :func:`diversify_experts` then masks each layer's experts
    (seed ``seed + layer``). The input model is left unchanged.
    """
    if not isinstance(lm, LM):
        raise TypeError(f"upcycle_lm takes a gatelab LM, got {type(lm).__name__}")
    if lm.config.moe_layer_indices():
        raise ValueError(
            f"upcycle_lm needs an LM whose FFNs are all dense; this one has MoE layers "
            f"{lm.config.moe_layer_indices()} (build it with moe_layers='none')"
        )
    moe = lm.config.moe.replace(
        num_experts=num_experts,
        top_k=top_k,
        hidden_dim=lm.config.ffn_hidden_dim,
        router=router,
        router_kwargs=dict(router_kwargs or {}),
    )
    config = lm.config.replace(moe_layers="all", moe=moe, **config_changes)
    new = LM(config).to(lm.embed.weight.device, lm.embed.weight.dtype)
    ffn_prefixes = tuple(f"blocks.{i}.ffn." for i in range(config.num_layers))
    dense_state = {k: v for k, v in lm.state_dict().items() if not k.startswith(ffn_prefixes)}
    missing, unexpected = new.load_state_dict(dense_state, strict=False)
    if unexpected or any(not k.startswith(ffn_prefixes) for k in missing):
        raise RuntimeError(f"upcycle_lm: unmatched tensors {unexpected or missing}")
    for i, (old_block, new_block) in enumerate(zip(lm.blocks, new.blocks, strict=True)):
        moe = new_block.ffn
        copy_into_bank(moe.experts, read_dense_ffn(old_block.ffn))
        init_router(moe.router, router_std)
        if diversify:
            diversify_experts(moe, diversify, rescale=rescale, seed=seed + i)
    return new


@torch.no_grad()
def upcycle_optimizer_state(
    dense_lm: LM,
    dense_optimizer: torch.optim.Optimizer,
    moe_lm: LM,
    moe_optimizer: torch.optim.Optimizer,
) -> int:
    """Carry a dense LM's per-parameter optimizer state (AdamW moments, step) into its
    upcycled MoE LM, so training continues instead of restarting its moments.

    Parameters with the same name and shape (embedding, attention, norms) get a copy of
    their state; each expert bank gets its layer's dense FFN state, repeated for every
    expert as :func:`upcycle_lm` repeats the weights (``ffn.gate_up_proj.weight`` ->
    ``ffn.experts.gate_up_proj``, ``ffn.down_proj.weight`` -> ``ffn.experts.down_proj``).
    Routers have no dense counterpart and start with no state. Call it before the first
    step of ``moe_optimizer``. Returns the number of parameters that received state.
    """
    dense = dict(dense_lm.named_parameters())
    carried = 0
    for name, param in moe_lm.named_parameters():
        source = dense.get(_dense_name(name))
        state = dense_optimizer.state.get(source) if source is not None else None
        if not state or (param.shape != source.shape and param.shape[1:] != source.shape):
            continue
        moved = {}
        for key, value in state.items():
            if isinstance(value, Tensor) and value.shape == source.shape and value.dim():
                value = value.expand(param.shape) if value.shape != param.shape else value
            moved[key] = value.clone() if isinstance(value, Tensor) else value
        moe_optimizer.state[param] = moved
        carried += 1
    return carried


def _dense_name(moe_name: str) -> str:
    """The dense LM's parameter that an upcycled LM's parameter was copied from."""
    for bank, dense in (
        ("experts.gate_up_proj", "gate_up_proj.weight"),
        ("experts.down_proj", "down_proj.weight"),
    ):
        if moe_name.endswith(".ffn." + bank):
            return moe_name[: -len(bank)] + dense
    return moe_name


__all__ = [
    "copy_into_bank",
    "diversify_experts",
    "init_router",
    "upcycle_ffn",
    "upcycle_lm",
    "upcycle_optimizer_state",
]
