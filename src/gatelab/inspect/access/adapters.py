"""How model families expose their MoE blocks: the adapter protocol, the registry, gatelab's.

Model families plug in through :func:`register_adapter`. The HF adapter is
``gatelab.hf.access.HFAdapter``; for a model whose class comes from ``transformers``,
:func:`load_hf_adapter_for` imports it on demand and registers it (``importlib``: the
access layer and the rest of the core keep no static dependency on ``gatelab.hf``, so
transformers stays optional, and ``gatelab.hf`` needs nothing from here).
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor, nn

from ...experts import ExpertWeights
from ...layers import MoE
from ...routing import ExpertChoiceRouter, HashRouter, Router, Routing, apply_capacity

if TYPE_CHECKING:
    from .blocks import MoEBlock
    from .edit import Edit
    from .hooks import BlockHooks


class BlockAdapter(Protocol):
    """How one model family exposes its MoE blocks (see :func:`register_adapter`)."""

    family: str

    def find(self, model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
        """(name, fields) per MoE block; fields are MoEBlock's module..family. [] if none."""

    def install(self, block: MoEBlock, hooks: BlockHooks) -> list[Any]:
        """Install the hooks that pass every Routing through ``hooks.apply``; return handles."""

    def expert_weights(self, block: MoEBlock) -> ExpertWeights:
        """The block's routed experts as [E, ...] views."""

    def restrict(self, block: MoEBlock, allowed: Tensor) -> Edit:
        """A routing edit: the router's own rule with the experts outside ``allowed`` [E]
        out of reach (the masked original of pruning, the reroute mode of steering)."""

    def prune(self, model: nn.Module, blocks: list[MoEBlock], keep: dict[int, list[int]]):
        """A physically smaller model keeping ``keep[layer]`` experts per block."""


_ADAPTERS: list[BlockAdapter] = []


def register_adapter(adapter: BlockAdapter) -> None:
    """Add a family adapter (idempotent by ``family``); later ones are tried first."""
    _ADAPTERS[:] = [a for a in _ADAPTERS if a.family != adapter.family]
    _ADAPTERS.insert(0, adapter)


def adapters() -> list[str]:
    """The registered families, in the order they are tried."""
    return [a.family for a in _ADAPTERS]


def registered() -> list[BlockAdapter]:
    """The registered adapters, in the order they are tried (a copy)."""
    return list(_ADAPTERS)


def load_hf_adapter_for(model: nn.Module) -> None:
    """Register gatelab.hf's adapter when ``model`` is a transformers model."""
    is_hf = any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)
    if is_hf and "hf" not in adapters():
        # By name, on demand: only a model built by transformers reaches here, so the
        # import cannot fail for want of transformers, and the core keeps no static
        # dependency on gatelab.hf.
        register_adapter(importlib.import_module("gatelab.hf.access").HFAdapter())


class GatelabAdapter:
    """gatelab's own :class:`~gatelab.layers.MoE` layers."""

    family = "gatelab"

    def find(self, model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
        return [
            (
                name or type(module).__name__,
                dict(
                    module=module,
                    router=module.router,
                    experts=module.experts,
                    num_experts=module.num_experts,
                    top_k=module.top_k,
                    has_shared=module.shared_experts is not None,
                    family=self.family,
                ),
            )
            for name, module in model.named_modules()
            if isinstance(module, MoE)
        ]

    def install(self, block: MoEBlock, hooks: BlockHooks) -> list[Any]:
        def pre_hook(module, args, kwargs):
            # MoE.forward(x, token_ids, token_mask, routing_edit): the caller's own edit,
            # positional or by keyword, runs first.
            args, kwargs = list(args), dict(kwargs)
            theirs = args.pop(3) if len(args) > 3 else kwargs.pop("routing_edit", None)
            if theirs is None:
                kwargs["routing_edit"] = hooks.apply
            else:
                kwargs["routing_edit"] = lambda routing: hooks.apply(theirs(routing))
            return tuple(args), kwargs

        return [block.module.register_forward_pre_hook(pre_hook, with_kwargs=True)]

    def expert_weights(self, block: MoEBlock) -> ExpertWeights:
        return block.experts.weights()

    def restrict(self, block: MoEBlock, allowed: Tensor) -> Edit:
        """The routing edit that re-runs the router's own rule on its logits with the
        experts outside ``allowed`` out of reach (:meth:`Router.route_restricted`: logits
        and any selection bias at -inf), then the layer's capacity limit, if it has one.

        The router is only called, never patched: the edit reads the Routing's logits
        (what ``compute_logits`` gave) and hands them to ``route_restricted``.
        """
        router, layer = block.router, block.module
        _check_restrictable(block)

        def edit(routing: Routing) -> Routing:
            out = router.route_restricted(routing.logits, allowed.to(routing.logits.device))
            if getattr(layer, "capacity_factor", None) is not None:
                out = apply_capacity(out, layer.capacity_factor)
            return out.replace(logits=routing.logits, aux={**routing.aux, **out.aux})

        return edit

    def prune(self, model: nn.Module, blocks: list[MoEBlock], keep: dict[int, list[int]]):
        """A new model of the same class with ``config.num_experts`` = the kept count and
        the kept rows of every router and expert tensor (same count in every layer)."""
        counts = {len(ids) for ids in keep.values()}
        config = getattr(model, "config", None)
        if (
            len(counts) != 1
            or not dataclasses.is_dataclass(config)
            or not hasattr(config, "num_experts")
        ):
            raise ValueError(
                "pruning a gatelab model rebuilds it from its config: the model needs a "
                "dataclass config with num_experts and the same kept count in every layer "
                f"(got counts {sorted(counts)})"
            )
        (count,) = counts
        pruned = type(model)(dataclasses.replace(config, num_experts=count))
        state = model.state_dict()
        for block in blocks:
            ids = torch.tensor(sorted(keep[block.layer]), dtype=torch.long)
            for prefix in (f"{block.name}.router.", f"{block.name}.experts."):
                for key in [k for k in state if k.startswith(prefix)]:
                    if state[key].dim() and state[key].shape[0] == block.num_experts:
                        state[key] = state[key][ids.to(state[key].device)].clone()
        pruned.load_state_dict(state)
        return pruned.to(next(model.parameters()).device).train(model.training)


def _check_restrictable(block: MoEBlock) -> None:
    router = block.router
    if isinstance(router, (HashRouter, ExpertChoiceRouter)):
        raise ValueError(
            f"layer {block.layer}: expert pruning needs a token-choice router; "
            f"{type(router).__name__} assigns experts without per-expert logits"
        )
    if type(router).route is Router.route:
        raise ValueError(
            f"layer {block.layer}: {type(router).__name__} defines no route(logits), so its "
            "rule cannot be re-run on restricted logits; split its forward into "
            "compute_logits(x) and route(logits) (see gatelab.routing.Router)"
        )


register_adapter(GatelabAdapter())
