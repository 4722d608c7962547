"""The MoE blocks of a model: :class:`MoEBlock`, :func:`find_moe_blocks`, :func:`select_blocks`.

A *block* is one MoE layer: a router that decides, experts that run. gatelab's own
:class:`~gatelab.layers.MoE` is one; so is every Hugging Face v5 MoE block, which the
registered adapters (:mod:`.adapters`) recognise.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from ...dispatch import grouped_dispatch
from ...experts import ExpertWeights
from ...routing import Routing
from .adapters import BlockAdapter, adapters, load_hf_adapter_for, registered


class NoMoEBlocksError(ValueError):
    """The model holds no MoE block any registered adapter recognises."""


@dataclass(frozen=True, eq=False)
class MoEBlock:
    """One MoE layer of a model, as the access layer sees it.

    Attributes:
        index: position among the model's MoE blocks (0, 1, ...).
        layer: the decoder-layer number (the first integer in ``name``: ``model.layers.3.mlp``
            -> 3, ``blocks.3.ffn`` -> 3), or ``index`` when the name has none. Every API
            of the access layer keys layers by this number.
        name: qualified module name in the model.
        module: the block (gatelab ``MoE``, HF ``*SparseMoeBlock`` / ``DeepseekV3MoE`` /
            ``GptOssMLP`` ...).
        router, experts: its router and experts modules.
        num_experts, top_k: E and k.
        has_shared: whether the block also runs a shared expert (not routed).
        family: "gatelab" or the HF ``model_type`` ("mixtral", "deepseek_v3", ...).
        adapter: the adapter that found it (reads weights, installs hooks).
        parent: the module that holds the block (the decoder layer: the residual stream
            passes through it), or None when the block is the model itself.
    """

    index: int
    layer: int
    name: str
    module: nn.Module
    router: nn.Module
    experts: nn.Module
    num_experts: int
    top_k: int
    has_shared: bool
    family: str
    adapter: BlockAdapter = field(repr=False)
    parent: nn.Module | None = field(default=None, repr=False)

    def expert_weights(self) -> ExpertWeights:
        """The routed experts as gatelab ``ExpertWeights`` ([E, ...] views of the parameters)."""
        return self.adapter.expert_weights(self)

    def run_experts(self, x: Tensor, routing: Routing) -> Tensor:
        """The routed experts' combined output [T, D] for inputs x [T, D] (no shared expert)."""
        weights = self.expert_weights()
        out = grouped_dispatch(
            x.to(weights.w_in.dtype),
            routing.experts,
            routing.weights.to(weights.w_in.dtype),
            weights,
            deterministic=True,
        )
        return out.to(x.dtype)


_WHAT_WE_LOOK_FOR = (
    "a gatelab.layers.MoE module, or an HF transformers v5 MoE block: a module with an "
    "'experts' child holding 3-D gate_up_proj/up_proj and down_proj parameters and a "
    "'gate' or 'router' child with an [num_experts, hidden] weight and top_k "
    "(Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...)"
)


def find_moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every MoE block of ``model`` in module order.

    Raises:
        TypeError: ``model`` is not an nn.Module.
        NoMoEBlocksError: no block found; the message says what was looked for.
    """
    if isinstance(model, (list, tuple)) and all(isinstance(b, MoEBlock) for b in model):
        return list(model)
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model must be a torch nn.Module (a gatelab model or an HF model), got "
            f"{type(model).__name__}; load a directory with gatelab.edit.open_model(path)"
        )
    load_hf_adapter_for(model)
    found: list[tuple[str, dict[str, Any], BlockAdapter]] = []
    for adapter in registered():
        found = [(name, fields, adapter) for name, fields in adapter.find(model)]
        if found:
            break
    if not found:
        raise NoMoEBlocksError(
            f"{type(model).__name__} has no MoE blocks; looked for {_WHAT_WE_LOOK_FOR}. "
            f"Registered adapters: {', '.join(adapters()) or 'none'}"
        )
    layers = _layer_numbers([name for name, _, _ in found])
    return [
        MoEBlock(
            index=i,
            layer=layer,
            name=name,
            adapter=adapter,
            parent=_parent(model, name, fields["module"]),
            **fields,
        )
        for i, ((name, fields, adapter), layer) in enumerate(zip(found, layers, strict=True))
    ]


def _parent(model: nn.Module, name: str, module: nn.Module) -> nn.Module | None:
    if module is model:
        return None
    path, _, _ = name.rpartition(".")
    return model.get_submodule(path) if path else model


def _layer_numbers(names: Sequence[str]) -> list[int]:
    numbers = []
    for name in names:
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        numbers.append(int(match.group(1)) if match else -1)
    if -1 in numbers or len(set(numbers)) != len(numbers):
        return list(range(len(names)))
    return numbers


def select_blocks(model, layers: Iterable[int] | None = None) -> list[MoEBlock]:
    """The blocks of ``model`` (or a list of MoEBlock) whose ``layer`` is in ``layers``."""
    blocks = find_moe_blocks(model)
    if layers is None:
        return blocks
    wanted = list(layers)
    by_layer = {b.layer: b for b in blocks}
    unknown = [layer for layer in wanted if layer not in by_layer]
    if unknown:
        raise ValueError(
            f"layers {unknown} have no MoE block; the MoE layers are {sorted(by_layer)}"
        )
    return [by_layer[layer] for layer in wanted]
