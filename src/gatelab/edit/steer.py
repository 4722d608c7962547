"""Steer an MoE model at inference: switch experts off, force them on, clamp neurons.

Implements the interventions of MoTE, "Mixture of Tunable Experts" (Dahlke et al., arXiv
2502.11096): switching an expert off removes it from the routing; forcing it on adds it to
every token's selected set. The paper does not give its re-weighting (the notes found no
code), so the choices here are documented and selectable:

- off, ``mode="drop"`` (default): the expert's slots become EMPTY. ``renormalize=False``
  leaves the other weights as the router gave them (the expert's contribution is simply
  removed, which is what zeroing its output would do); ``renormalize=True`` rescales each
  token's remaining weights to their previous sum.
- off, ``mode="reroute"``: the router chooses among the other experts only (its own rule on
  its logits, as :func:`gatelab.edit.prune.restrict_experts` does), so each token takes
  its next choice instead. Another reading of "removes it from routing".
- on: tokens that do not already use the expert get one more slot holding it, with the
  router's own score for it (``Routing.scores``: softmax probability, or DeepSeek's sigmoid
  score) as the weight; ``renormalize=True`` then rescales each token's weights to their
  previous sum. Tokens that already use it keep their routing.

Neuron clamping follows GateBreaker (Wu et al., arXiv 2512.21008): the chosen intermediate
neurons of an expert are clamped to 0. A neuron at 0 contributes nothing to the expert's
down projection, so clamping is done by zeroing its column of ``down_proj`` for that expert
(exact, no hook in the expert's inner loop). Only 0 is supported, for that reason.

Every edit is reversible and composable: each function returns a handle with ``remove()``
(also a context manager). Routing edits stack through :func:`gatelab.edit.edit_routing`;
clamps are reference-counted per neuron, so overlapping clamps undo in any order.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor

from ..inspect.access import EditHandle, edit_routing, find_moe_blocks, select_blocks
from ..routing import EMPTY, Routing


def switch_off(experts: Sequence[int] | Tensor, renormalize: bool = False):
    """A routing edit that removes ``experts`` (ids) from every token's slots."""
    ids = torch.as_tensor(list(experts) if not isinstance(experts, Tensor) else experts)

    def edit(routing: Routing) -> Routing:
        before = routing.weights.sum(dim=1, keepdim=True)
        out = routing.mask_experts(ids.to(routing.experts.device))
        return _rescale(out, before) if renormalize else out

    return edit


def force_on(experts: Sequence[int] | Tensor, renormalize: bool = False):
    """A routing edit that adds ``experts`` to every token that does not already use them,
    with the router's score as the weight (see the module doc)."""
    ids = [int(e) for e in (experts.tolist() if isinstance(experts, Tensor) else experts)]

    def edit(routing: Routing) -> Routing:
        if any(not 0 <= e < routing.num_experts for e in ids):
            raise ValueError(f"force_on: ids {ids} out of range 0..{routing.num_experts - 1}")
        before = routing.weights.sum(dim=1, keepdim=True)
        new_experts, new_weights = [routing.experts], [routing.weights]
        for e in ids:
            has = (routing.experts == e).any(dim=1, keepdim=True)
            column = torch.full_like(routing.experts[:, :1], e)
            score = routing.scores[:, e : e + 1].to(routing.weights.dtype)
            new_experts.append(torch.where(has, torch.full_like(column, EMPTY), column))
            new_weights.append(torch.where(has, torch.zeros_like(score), score))
        out = routing.replace(experts=torch.cat(new_experts, 1), weights=torch.cat(new_weights, 1))
        return _rescale(out, before) if renormalize else out

    return edit


def _rescale(routing: Routing, before: Tensor) -> Routing:
    total = routing.weights.sum(dim=1, keepdim=True)
    scale = torch.where(total > 0, before / total.clamp_min(1e-20), torch.ones_like(total))
    return routing.replace(weights=routing.weights * scale)


def _per_layer(model, spec) -> dict[int, list[int]]:
    """{layer: ids} from a dict, or a list of ids for every MoE layer."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping):
        select_blocks(model, list(spec))  # unknown layers raise, naming the valid ones
        return {int(k): [int(e) for e in v] for k, v in spec.items() if len(v)}
    return {b.layer: [int(e) for e in spec] for b in find_moe_blocks(model)}


STEER_MODES = ("drop", "reroute")


def steer_experts(
    model,
    off: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
    on: Mapping[int, Sequence[int]] | Sequence[int] | None = None,
    renormalize: bool = False,
    mode: str = "drop",
) -> EditHandle:
    """Switch experts off and/or force them on, per layer ({layer: [ids]}) or in every MoE
    layer (a list of ids); ``mode`` says how "off" works (module doc). Returns the handle
    that undoes it."""
    if mode not in STEER_MODES:
        raise ValueError(f"mode must be one of {STEER_MODES}, got {mode!r}")
    off_map, on_map = _per_layer(model, off), _per_layer(model, on)
    for layer in set(off_map) & set(on_map):
        both = set(off_map[layer]) & set(on_map[layer])
        if both:
            raise ValueError(f"layer {layer}: experts {sorted(both)} are both off and on")
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    edits = {}
    for layer in sorted(set(off_map) | set(on_map)):
        for e in off_map.get(layer, []) + on_map.get(layer, []):
            if not 0 <= e < blocks[layer].num_experts:
                raise ValueError(
                    f"layer {layer}: expert {e} out of range 0..{blocks[layer].num_experts - 1}"
                )
        steps = []
        if off_map.get(layer) and mode == "reroute":
            block = blocks[layer]
            allowed = torch.ones(block.num_experts, dtype=torch.bool)
            allowed[off_map[layer]] = False
            if int(allowed.sum()) < block.top_k:
                raise ValueError(
                    f"layer {layer}: rerouting needs top_k={block.top_k} experts left on"
                )
            steps.append(block.adapter.restrict(block, allowed))
        elif off_map.get(layer):
            steps.append(switch_off(off_map[layer], renormalize))
        if on_map.get(layer):
            steps.append(force_on(on_map[layer], renormalize))
        edits[layer] = steps[0] if len(steps) == 1 else _chain(steps)
    if not edits:
        raise ValueError("steer_experts: name at least one expert to switch off or on")
    return edit_routing(model, edits)


def _chain(steps):
    def edit(routing: Routing) -> Routing:
        for step in steps:
            routing = step(routing)
        return routing

    return edit


# -- neuron clamps ------------------------------------------------------------------------------

# (data_ptr of the down-projection storage, expert, neuron) -> [count, saved column]
_CLAMPED: dict[tuple[int, int, int], list] = {}


class ClampHandle:
    """Undo for :func:`clamp_neurons` (reference-counted per neuron)."""

    def __init__(self, entries: list[tuple[Tensor, int, int]]):
        self._entries = entries

    def remove(self) -> None:
        with torch.no_grad():
            while self._entries:
                w_out, expert, neuron = self._entries.pop()
                key = (w_out.data_ptr(), expert, neuron)
                slot = _CLAMPED[key]
                slot[0] -= 1
                if slot[0] == 0:
                    w_out[expert, :, neuron] = slot[1]
                    del _CLAMPED[key]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def clamp_neurons(model, neurons: Iterable, value: float = 0.0) -> ClampHandle:
    """Clamp intermediate neurons of routed experts to 0 (GateBreaker's removal).

    ``neurons``: (layer, expert, neuron) triples, or dicts with those keys (the output of
    :func:`gatelab.inspect.localize.localize_neurons`). Returns the undo handle.
    """
    if value != 0.0:
        raise ValueError(
            f"clamp_neurons supports value=0 only (got {value}): it zeroes the neuron's "
            "down-projection column, which equals clamping the activation to 0"
        )
    triples = [
        (int(n["layer"]), int(n["expert"]), int(n["neuron"]))
        if isinstance(n, Mapping)
        else tuple(int(v) for v in n)
        for n in neurons
    ]
    blocks = {b.layer: b for b in select_blocks(model, sorted({t[0] for t in triples}))}
    checked = []
    for layer, expert, neuron in triples:
        w_out = blocks[layer].expert_weights().w_out  # [E, D, F] (a view for HF's layouts)
        if not (0 <= expert < w_out.shape[0] and 0 <= neuron < w_out.shape[2]):
            raise ValueError(
                f"neuron ({layer}, {expert}, {neuron}) out of range: layer {layer} has "
                f"{w_out.shape[0]} experts of {w_out.shape[2]} neurons"
            )
        checked.append((w_out, expert, neuron))
    entries = []
    with torch.no_grad():
        for w_out, expert, neuron in checked:
            key = (w_out.data_ptr(), expert, neuron)
            slot = _CLAMPED.setdefault(key, [0, w_out[expert, :, neuron].clone()])
            slot[0] += 1
            w_out[expert, :, neuron] = 0.0
            entries.append((w_out, expert, neuron))
    return ClampHandle(entries)


__all__ = [
    "STEER_MODES",
    "ClampHandle",
    "clamp_neurons",
    "force_on",
    "steer_experts",
    "switch_off",
]
