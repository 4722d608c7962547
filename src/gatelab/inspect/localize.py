"""Contrastive neuron localisation inside chosen experts.

Implements the expert-level step of GateBreaker (Wu et al., arXiv 2512.21008, eqs. 7-11),
generic over prompt sets:

- signature v_{l,j}(q) [F]: the element-wise max, over the tokens of prompt q routed to
  expert j of layer l, of the expert's intermediate activation (what its down projection
  reads: act(gate) * up for GLU experts);
- weight per neuron: w_n = mean over target prompts of v_n - mean over other prompts of v_n;
- z-score within the expert: z = (w - mean(w)) / std(w); the neurons with z > tau
  (default 2) are the localised ones. GateBreaker then clamps them to 0 at inference:
  :func:`gatelab.edit.steer.clamp_neurons` takes the returned list as is.

Departures: the paper contrasts harmful and benign prompts; here any two prompt sets.
A prompt whose tokens never reach expert j has no signature for it and is left out of
that expert's means (the paper's formula is silent on it); an expert that either set never
reaches gets no z-scores and is reported under ``skipped``. GateBreaker treats shared
experts with separate equations; this module covers routed experts only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from .access import MoEBlock, capture_routing, select_blocks
from .prompts import forward_ids, prompt_batches


@dataclass
class NeuronReport:
    """``neurons``: [{"layer", "expert", "neuron", "z", "diff"}] with z > threshold, highest
    z first; ``experts``: per (layer, expert) the prompt counts and the z-score spread;
    ``skipped``: experts with no routed token in one of the sets."""

    threshold: float
    neurons: list[dict[str, Any]]
    experts: list[dict[str, Any]]
    skipped: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "neurons": self.neurons,
            "experts": self.experts,
            "skipped": self.skipped,
        }

    def as_clamp_list(self) -> list[tuple[int, int, int]]:
        """(layer, expert, neuron) triples for :func:`gatelab.edit.steer.clamp_neurons`."""
        return [(n["layer"], n["expert"], n["neuron"]) for n in self.neurons]


def _check_experts(blocks: list[MoEBlock], experts: Mapping[int, Sequence[int]]):
    by_layer = {b.layer: b for b in blocks}
    for layer, ids in experts.items():
        block = by_layer[layer]
        bad = [e for e in ids if not 0 <= int(e) < block.num_experts]
        if bad or not ids:
            raise ValueError(
                f"experts for layer {layer} must be a non-empty list of ids in "
                f"0..{block.num_experts - 1}, got {list(ids)}"
            )


def expert_signatures(
    model, prompts: Iterable, experts: Mapping[int, Sequence[int]], name: str = "prompts"
) -> dict[tuple[int, int], Tensor]:
    """Per (layer, expert): [P_j, F] signatures of the prompts that reach the expert."""
    if not experts:
        raise ValueError("experts must name at least one {layer: [expert ids]}")
    blocks = select_blocks(model, list(experts))
    _check_experts(blocks, experts)
    batches = prompt_batches(model, prompts, name)
    found: dict[tuple[int, int], list[Tensor]] = {
        (layer, int(e)): [] for layer, ids in experts.items() for e in ids
    }
    with capture_routing(blocks, hidden=True) as cap:
        for ids in batches:
            cap.clear()
            forward_ids(model, ids)
            for block in blocks:
                x, routing = cap.input(block.layer), cap.routing(block.layer)
                for e in experts[block.layer]:
                    found[(block.layer, int(e))].append(
                        _max_activation(block, int(e), x, routing, ids.shape)
                    )
    return {key: torch.cat(parts) for key, parts in found.items()}


def _max_activation(block: MoEBlock, expert: int, x: Tensor, routing, shape) -> Tensor:
    """[prompts reaching the expert, F]: max over each prompt's routed tokens."""
    batch, seq = shape
    tokens = (routing.experts == expert).any(dim=1).nonzero().squeeze(1)
    weights = block.expert_weights()
    f = weights.w_out.shape[2]
    if tokens.numel() == 0:
        return torch.zeros(0, f)
    with torch.no_grad():
        hidden = x[tokens].to(weights.w_in.dtype) @ weights.w_in[expert].T
        if weights.b_in is not None:
            hidden = hidden + weights.b_in[expert]
        act = weights.activate(hidden).float().cpu()
    rows = (tokens // seq).cpu()
    out = torch.full((batch, f), float("-inf"))
    out.scatter_reduce_(0, rows[:, None].expand(-1, f), act, reduce="amax")
    return out[torch.unique(rows)]


def localize_neurons(
    model,
    target: Iterable,
    other: Iterable,
    experts: Mapping[int, Sequence[int]],
    threshold: float = 2.0,
) -> NeuronReport:
    """GateBreaker's localisation: neurons of ``experts`` ({layer: [ids]}) that fire more
    for ``target`` prompts than for ``other`` prompts (z-score of the difference of mean
    signatures above ``threshold``)."""
    target_sig = expert_signatures(model, target, experts, "target")
    other_sig = expert_signatures(model, other, experts, "other")
    neurons, stats, skipped = [], [], []
    for (layer, expert), a in target_sig.items():
        b = other_sig[(layer, expert)]
        if a.shape[0] == 0 or b.shape[0] == 0:
            skipped.append(
                {
                    "layer": layer,
                    "expert": expert,
                    "target_prompts": a.shape[0],
                    "other_prompts": b.shape[0],
                }
            )
            continue
        diff = a.mean(dim=0) - b.mean(dim=0)
        z = (diff - diff.mean()) / diff.std().clamp_min(1e-12)
        chosen = (z > threshold).nonzero().squeeze(1)
        stats.append(
            {
                "layer": layer,
                "expert": expert,
                "target_prompts": a.shape[0],
                "other_prompts": b.shape[0],
                "neurons": diff.numel(),
                "selected": chosen.numel(),
                "max_z": float(z.max()),
            }
        )
        neurons += [
            {
                "layer": layer,
                "expert": expert,
                "neuron": int(n),
                "z": float(z[n]),
                "diff": float(diff[n]),
            }
            for n in chosen
        ]
    neurons.sort(key=lambda n: -n["z"])
    return NeuronReport(threshold, neurons, stats, skipped)


__all__ = ["NeuronReport", "expert_signatures", "localize_neurons"]
