"""One access layer over the MoE blocks of any model: find them, capture their Routing, edit it.

A *block* is one MoE layer: a router that decides, experts that run. gatelab's own
:class:`~gatelab.layers.MoE` is one; so is every Hugging Face v5 MoE block (Mixtral,
Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, ...), which ``gatelab.hf.access`` teaches
this module to read. The same three calls work on both::

    blocks = find_moe_blocks(model)                  # [MoEBlock], one per MoE layer
    with capture_routing(model, hidden=True) as cap: # the exact Routing of every forward
        model(ids)
    cap.routing(layer)                               # Routing over all recorded tokens
    with edit_routing(model, {layer: fn}):           # fn: Routing -> Routing
        model(ids)                                   # runs with the edited routing

How it works: each block gets at most one hook set, owned by a per-block ``_BlockHooks``
that holds an ordered list of edits and of recorders. Every Routing the block produces goes
through the edits (in the order they were added) and then to the recorders, so a capture
always sees what the experts ran with, whatever order capture and edits were opened in.
When the last edit and recorder of a block are removed, its hooks are removed too.

- gatelab ``MoE``: a forward pre-hook passes ``routing_edit`` (composed with one the caller
  passed) so the Routing is taken after capacity, exactly as the experts see it.
- HF blocks: a forward hook on the router converts its ``(router_logits, top_k_weights,
  top_k_index)`` to a Routing and, when edits are active, back (see ``gatelab.hf.access``).
  The Routing is the router's own output, never recomputed (DeepSeek's bias and groups).

Model families plug in through :func:`register_adapter`. The HF adapter is
``gatelab.hf.access.HFAdapter``; for a model whose class comes from ``transformers``,
:func:`find_moe_blocks` imports it on demand and registers it (``importlib``: this module
and the rest of the core keep no static dependency on ``gatelab.hf``, so transformers stays
optional, and ``gatelab.hf`` needs nothing from here).

This module sits in ``inspect/`` so that both the inspection tools (profile, localise) and
the edits in ``edit/`` (which may import ``inspect``) build on it; ``gatelab.edit``
re-exports it.
"""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from ..dispatch import grouped_dispatch
from ..experts import ExpertWeights
from ..layers import MoE
from ..routing import ExpertChoiceRouter, HashRouter, Routing, apply_capacity

Edit = Callable[[Routing], Routing]
"""A routing edit: a function Routing -> Routing (switch experts off, force them on, skip...)."""


class NoMoEBlocksError(ValueError):
    """The model holds no MoE block any registered adapter recognises."""


@dataclass(frozen=True, eq=False)
class MoEBlock:
    """One MoE layer of a model, as the access layer sees it.

    Attributes:
        index: position among the model's MoE blocks (0, 1, ...).
        layer: the decoder-layer number (the first integer in ``name``: ``model.layers.3.mlp``
            -> 3, ``blocks.3.ffn`` -> 3), or ``index`` when the name has none. Every API
            of this module keys layers by this number.
        name: qualified module name in the model.
        module: the block (gatelab ``MoE``, HF ``*SparseMoeBlock`` / ``DeepseekV3MoE`` /
            ``GptOssMLP`` ...).
        router, experts: its router and experts modules.
        num_experts, top_k: E and k.
        has_shared: whether the block also runs a shared expert (not routed).
        family: "gatelab" or the HF ``model_type`` ("mixtral", "deepseek_v3", ...).
        adapter: the adapter that found it (reads weights, installs hooks).
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


class BlockAdapter(Protocol):
    """How one model family exposes its MoE blocks (see :func:`register_adapter`)."""

    family: str

    def find(self, model: nn.Module) -> list[tuple[str, dict[str, Any]]]:
        """(name, fields) per MoE block; fields are MoEBlock's module..family. [] if none."""

    def install(self, block: MoEBlock, hooks: _BlockHooks) -> list[Any]:
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


# -- finding blocks --------------------------------------------------------------------------

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
    _load_hf_adapter_for(model)
    found: list[tuple[str, dict[str, Any], BlockAdapter]] = []
    for adapter in _ADAPTERS:
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
        MoEBlock(index=i, layer=layer, name=name, adapter=adapter, **fields)
        for i, ((name, fields, adapter), layer) in enumerate(zip(found, layers, strict=True))
    ]


def _layer_numbers(names: Sequence[str]) -> list[int]:
    numbers = []
    for name in names:
        match = re.search(r"(?:^|\.)(\d+)(?:\.|$)", name)
        numbers.append(int(match.group(1)) if match else -1)
    if -1 in numbers or len(set(numbers)) != len(numbers):
        return list(range(len(names)))
    return numbers


def _load_hf_adapter_for(model: nn.Module) -> None:
    """Register gatelab.hf's adapter when ``model`` is a transformers model."""
    is_hf = any(cls.__module__.startswith("transformers.") for cls in type(model).__mro__)
    if is_hf and not any(a.family == "hf" for a in _ADAPTERS):
        # By name, on demand: only a model built by transformers reaches here, so the
        # import cannot fail for want of transformers, and the core keeps no static
        # dependency on gatelab.hf.
        register_adapter(importlib.import_module("gatelab.hf.access").HFAdapter())


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


# -- the per-block hook owner ------------------------------------------------------------------

_HOOKS: weakref.WeakKeyDictionary[nn.Module, _BlockHooks] = weakref.WeakKeyDictionary()
_ids = itertools.count()


class _BlockHooks:
    """The edits and recorders of one block, and the hooks that serve them."""

    def __init__(self, block: MoEBlock):
        self.block = block
        self.edits: dict[int, Edit] = {}
        self.recorders: dict[int, Callable[[Routing], None]] = {}
        self.io_recorders: dict[int, Callable[[Tensor, Tensor], None]] = {}
        self.handles: list[Any] = []

    @property
    def editing(self) -> bool:
        return bool(self.edits)

    def apply(self, routing: Routing) -> Routing:
        """Edits in order, then every recorder sees the result."""
        for edit in list(self.edits.values()):
            routing = edit(routing)
            if not isinstance(routing, Routing):
                raise TypeError(
                    f"a routing edit on layer {self.block.layer} returned "
                    f"{type(routing).__name__}; an edit must return a Routing"
                )
        for record in list(self.recorders.values()):
            record(routing)
        return routing

    def record_io(self, x: Tensor, y: Tensor) -> None:
        for record in list(self.io_recorders.values()):
            record(x, y)

    def add(self, kind: str, fn) -> int:
        key = next(_ids)
        getattr(self, kind)[key] = fn
        if not self.handles:
            self.handles = self.block.adapter.install(self.block, self)
            self.handles.append(
                self.block.module.register_forward_hook(self._io_hook, with_kwargs=True)
            )
        return key

    def discard(self, kind: str, key: int) -> None:
        getattr(self, kind).pop(key, None)
        if not (self.edits or self.recorders or self.io_recorders):
            for handle in self.handles:
                handle.remove()
            self.handles = []
            _HOOKS.pop(self.block.module, None)

    def _io_hook(self, module, args, kwargs, output) -> None:
        if not self.io_recorders:
            return
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        self.record_io(x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1]))


def has_hooks(block: MoEBlock) -> bool:
    """True while a capture or an edit of this module is installed on the block."""
    return block.module in _HOOKS


def _hooks_for(block: MoEBlock) -> _BlockHooks:
    hooks = _HOOKS.get(block.module)
    if hooks is None:
        hooks = _HOOKS[block.module] = _BlockHooks(block)
    return hooks


class _Handle:
    """Undo for a set of registrations; a context manager; ``remove()`` is idempotent."""

    def __init__(self):
        self._registered: list[tuple[_BlockHooks, str, int]] = []

    def _add(self, block: MoEBlock, kind: str, fn) -> None:
        hooks = _hooks_for(block)
        self._registered.append((hooks, kind, hooks.add(kind, fn)))

    def remove(self) -> None:
        while self._registered:
            hooks, kind, key = self._registered.pop()
            hooks.discard(kind, key)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


# -- capture -----------------------------------------------------------------------------------


class RoutingCapture(_Handle):
    """Records, per MoE layer, the Routing of every forward (and optionally the block's
    input and output hidden states, flattened to [T, D]).

    ``routings[layer]`` is a list with one Routing per forward call; :meth:`routing` joins
    them along the token axis. With ``hidden=True``, ``inputs[layer]`` / ``outputs[layer]``
    hold the block's input and output (the output includes any shared expert). Everything
    is detached; ``to_cpu`` moves it to the CPU as it is recorded.
    """

    def __init__(
        self, model, layers: Iterable[int] | None = None, hidden: bool = False, to_cpu: bool = False
    ):
        super().__init__()
        self.blocks = select_blocks(model, layers)
        self.to_cpu = to_cpu
        self.routings: dict[int, list[Routing]] = {b.layer: [] for b in self.blocks}
        self.inputs: dict[int, list[Tensor]] = {b.layer: [] for b in self.blocks}
        self.outputs: dict[int, list[Tensor]] = {b.layer: [] for b in self.blocks}
        for block in self.blocks:
            self._add(block, "recorders", self._routing_recorder(block.layer))
            if hidden:
                self._add(block, "io_recorders", self._io_recorder(block.layer))

    def _move(self, t: Tensor) -> Tensor:
        return t.detach().cpu() if self.to_cpu else t.detach()

    def _routing_recorder(self, layer: int):
        def record(routing: Routing) -> None:
            r = routing.detach()
            if self.to_cpu:
                r = Routing(
                    r.logits.cpu(),
                    r.scores.cpu(),
                    r.experts.cpu(),
                    r.weights.cpu(),
                    {k: v.cpu() for k, v in r.aux.items() if isinstance(v, Tensor)},
                    check=False,
                )
            self.routings[layer].append(r)

        return record

    def _io_recorder(self, layer: int):
        def record(x: Tensor, y: Tensor) -> None:
            self.inputs[layer].append(self._move(x))
            self.outputs[layer].append(self._move(y))

        return record

    @property
    def layers(self) -> list[int]:
        return [b.layer for b in self.blocks]

    def routing(self, layer: int) -> Routing:
        """The Routing of all recorded tokens of ``layer`` (forward calls concatenated)."""
        got = self._get(self.routings, layer, "routing")
        if len(got) == 1:
            return got[0]
        width = max(r.num_slots for r in got)
        return Routing(
            torch.cat([r.logits for r in got]),
            torch.cat([r.scores for r in got]),
            torch.cat([_pad(r.experts, width, -1) for r in got]),
            torch.cat([_pad(r.weights, width, 0.0) for r in got]),
            check=False,
        )

    def input(self, layer: int) -> Tensor:
        """The block's recorded inputs [T, D] (needs ``hidden=True``)."""
        return torch.cat(self._get(self.inputs, layer, "input (capture with hidden=True)"))

    def output(self, layer: int) -> Tensor:
        """The block's recorded outputs [T, D] (needs ``hidden=True``)."""
        return torch.cat(self._get(self.outputs, layer, "output (capture with hidden=True)"))

    def clear(self) -> None:
        """Forget what was recorded; keep recording."""
        for store in (self.routings, self.inputs, self.outputs):
            for values in store.values():
                values.clear()

    def _get(self, store: dict[int, list], layer: int, what: str) -> list:
        if layer not in store:
            raise KeyError(f"layer {layer} was not captured; captured layers: {self.layers}")
        if not store[layer]:
            raise ValueError(f"no {what} recorded for layer {layer}: run a forward first")
        return store[layer]


def _pad(t: Tensor, width: int, value) -> Tensor:
    if t.shape[1] == width:
        return t
    return torch.cat([t, t.new_full((t.shape[0], width - t.shape[1]), value)], dim=1)


def capture_routing(
    model, layers: Iterable[int] | None = None, hidden: bool = False, to_cpu: bool = False
) -> RoutingCapture:
    """Start recording every MoE layer's Routing (see :class:`RoutingCapture`).

    Use as a context manager, or call ``remove()`` when done.
    """
    return RoutingCapture(model, layers, hidden=hidden, to_cpu=to_cpu)


# -- edits -------------------------------------------------------------------------------------


class EditHandle(_Handle):
    """Routing edits installed on a model; ``remove()`` (or leaving the ``with``) undoes them.

    Several handles stack: edits run in the order their handles were created. Removing one
    leaves the others in place.
    """

    def __init__(
        self, model, edits: Edit | Mapping[int, Edit], layers: Iterable[int] | None = None
    ):
        super().__init__()
        if isinstance(edits, Mapping):
            if layers is not None:
                raise ValueError("give layers either as the keys of edits or as layers=, not both")
            blocks = select_blocks(model, list(edits))
            per_layer = {b.layer: edits[b.layer] for b in blocks}
        else:
            if not callable(edits):
                raise TypeError(
                    "edits must be a function Routing -> Routing or a {layer: function} dict"
                )
            blocks = select_blocks(model, layers)
            per_layer = {b.layer: edits for b in blocks}
        for block in blocks:
            edit = per_layer[block.layer]
            if not callable(edit):
                raise TypeError(f"the edit for layer {block.layer} is not callable")
            self._add(block, "edits", edit)
        self.layers = [b.layer for b in blocks]


def edit_routing(
    model, edits: Edit | Mapping[int, Edit], layers: Iterable[int] | None = None
) -> EditHandle:
    """Apply routing edits to ``model`` until the returned handle is removed.

    ``edits`` is one function for every selected layer (``layers``; all MoE layers by
    default), or a dict {layer: function}.
    """
    return EditHandle(model, edits, layers)


def compose(*edits: Edit) -> Edit:
    """One edit that applies ``edits`` left to right."""

    def composed(routing: Routing) -> Routing:
        for edit in edits:
            routing = edit(routing)
        return routing

    return composed


# -- prompts -----------------------------------------------------------------------------------


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes: gatelab ``config.max_seq_len``, HF
    ``config.max_position_embeddings``; None when the model says nothing."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def prompt_batches(model: nn.Module, prompts, name: str = "prompts") -> list[Tensor]:
    """A prompt set as a list of int64 [B, S] tensors, checked against ``model``.

    ``prompts`` is a tensor [S] or [B, S], or an iterable of those (or of lists of ints);
    each row is one prompt. Raises ValueError for an empty set, an empty prompt, or a
    prompt longer than the model's context (the message names the set and the fix).
    """
    if isinstance(prompts, Tensor):
        prompts = [prompts]
    if isinstance(prompts, (str, bytes)):
        raise TypeError(f"{name}: give token ids (tensors or lists of ints), not text")
    batches = []
    for item in prompts:
        ids = torch.as_tensor(item)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dim() != 2 or ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(
                f"{name}: each prompt must be integer token ids [S] or [B, S], got "
                f"{tuple(ids.shape)} {ids.dtype}"
            )
        if ids.shape[1] == 0 or ids.shape[0] == 0:
            raise ValueError(f"{name}: a prompt has no tokens; drop it or give it text")
        batches.append(ids.long())
    if not batches:
        raise ValueError(f"the prompt set {name!r} is empty: give it at least one prompt")
    limit = context_length(model)
    longest = max(b.shape[1] for b in batches)
    if limit is not None and longest > limit:
        raise ValueError(
            f"{name}: a prompt has {longest} tokens, longer than the model's context of "
            f"{limit}; cut prompts to at most {limit} tokens"
        )
    return batches


def forward_ids(model: nn.Module, ids: Tensor):
    """One inference forward of token ids [B, S] on the model's device (no grad)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        return model(ids.to(device))


def next_token_loss(model: nn.Module, prompts, name: str = "prompts") -> float:
    """Mean next-token cross entropy (nats) of ``model`` over every prompt's tokens.

    Works on any model whose ``model(ids)`` has ``.logits`` [B, S, V] (gatelab LMs, HF
    causal LMs). Prompts need at least 2 tokens.
    """
    total, count = 0.0, 0
    for ids in prompt_batches(model, prompts, name):
        if ids.shape[1] < 2:
            raise ValueError(f"{name}: a prompt needs at least 2 tokens for a next-token loss")
        logits = forward_ids(model, ids).logits.float().cpu()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
        total, count = total + float(loss), count + ids[:, 1:].numel()
    return total / count


# -- the gatelab adapter -----------------------------------------------------------------------


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

    def install(self, block: MoEBlock, hooks: _BlockHooks) -> list[Any]:
        def pre_hook(module, args, kwargs):
            # MoE.forward(x, token_ids, token_mask, routing_edit): the caller's own edit,
            # positional or by keyword, runs first.
            args, kwargs = list(args), dict(kwargs)
            theirs = args.pop(3) if len(args) > 3 else kwargs.pop("routing_edit", None)
            kwargs["routing_edit"] = hooks.apply if theirs is None else compose(theirs, hooks.apply)
            return tuple(args), kwargs

        return [block.module.register_forward_pre_hook(pre_hook, with_kwargs=True)]

    def expert_weights(self, block: MoEBlock) -> ExpertWeights:
        return block.experts.weights()

    def restrict(self, block: MoEBlock, allowed: Tensor) -> Edit:
        """The routing edit that re-runs the router's own rule on its logits with the
        experts outside ``allowed`` out of reach (logits and any selection bias at -inf),
        then the layer's capacity limit, if it has one."""
        router, layer = block.router, block.module
        if isinstance(router, (HashRouter, ExpertChoiceRouter)):
            raise ValueError(
                f"layer {block.layer}: expert pruning needs a token-choice router; "
                f"{type(router).__name__} assigns experts without per-expert logits"
            )

        def edit(routing: Routing) -> Routing:
            mask = allowed.to(routing.logits.device)
            masked = routing.logits.masked_fill(~mask, float("-inf"))
            saved_bias = getattr(router, "expert_bias", None)
            router.compute_logits = lambda x: masked  # the router's rule on these logits
            try:
                if isinstance(saved_bias, Tensor):
                    router.expert_bias = saved_bias.masked_fill(~mask, float("-inf"))
                out = router(masked.new_zeros(masked.shape[0], router.dim))
            finally:
                del router.compute_logits
                if isinstance(saved_bias, Tensor):
                    router.expert_bias = saved_bias
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


register_adapter(GatelabAdapter())


__all__ = [
    "BlockAdapter",
    "Edit",
    "EditHandle",
    "GatelabAdapter",
    "MoEBlock",
    "NoMoEBlocksError",
    "RoutingCapture",
    "adapters",
    "capture_routing",
    "compose",
    "context_length",
    "edit_routing",
    "forward_ids",
    "has_hooks",
    "next_token_loss",
    "find_moe_blocks",
    "prompt_batches",
    "register_adapter",
    "select_blocks",
]
