"""Routing profiles by prompt set: which experts a kind of text uses, layer by layer.

Implements the gate-level profiling of

- MoTE, "Mixture of Tunable Experts" (Dahlke et al., arXiv 2502.11096): functional token
  resonance imaging (fTRI) sums each expert's activation over a prompt's tokens, averages
  the maps within each class of prompts, and scores a class by its average minus the
  average of all other classes;
- GateBreaker (Wu et al., arXiv 2512.21008), eqs. 4-6: f_{l,j}(q) = tokens of prompt q
  routed to expert j of layer l / tokens of q; utility u = mean of f over the prompts.

Per prompt set and layer x expert, :func:`profile_routing` reports

- ``frequency``: GateBreaker's u, the mean over prompts of the fraction of the prompt's
  tokens that have expert j in a slot;
- ``mean_weight``: the mean over prompts of the gate weight expert j gets per token (0 for
  tokens not routed to it), i.e. MoTE's summed activation divided by the prompt length.

Departures: MoTE sums over tokens without dividing by length; dividing makes prompts of
different lengths count alike (the brief's "mean gate weight"). MoTE's classes come from
labelled responses; here the sets are whatever the caller names. ``contrast(name)`` is
MoTE's score: the set's map minus the mean of the other sets' maps. Every token counts,
since the prompts come as token ids (GateBreaker masks chat-template tokens: pass prompts
without them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_write
from .access import capture_routing, forward_ids, prompt_batches, select_blocks

METRICS = ("frequency", "mean_weight")


@dataclass
class RoutingProfile:
    """Per prompt set: ``maps[name][metric]`` [L, E] (rows follow ``layers``),
    ``prompts[name]`` and ``tokens[name]`` counts."""

    layers: list[int]
    num_experts: int
    maps: dict[str, dict[str, Tensor]]
    prompts: dict[str, int]
    tokens: dict[str, int]

    @property
    def names(self) -> list[str]:
        return list(self.maps)

    def contrast(self, name: str, metric: str = "frequency") -> Tensor:
        """[L, E]: the set's map minus the mean of the other sets' maps (MoTE's score)."""
        self._check(name, metric)
        others = [self.maps[n][metric] for n in self.maps if n != name]
        if not others:
            raise ValueError(
                f"a contrast needs at least two prompt sets; the profile has only {name!r}"
            )
        return self.maps[name][metric] - torch.stack(others).mean(dim=0)

    def top_experts(
        self,
        name: str,
        n: int,
        metric: str = "frequency",
        contrast: bool = True,
        per_layer: bool = False,
    ) -> list[tuple[int, int, float]]:
        """The ``n`` highest (layer, expert, score) by contrast (or the set's own map), over
        all layers together (MoTE), or ``n`` in each layer with ``per_layer=True``
        (GateBreaker's top m*k per layer)."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        scores = self.contrast(name, metric) if contrast else self._check(name, metric)
        if per_layer:
            k = min(n, self.num_experts)
            values, experts = scores.topk(k, dim=1)
            return [
                (self.layers[i], int(e), float(v))
                for i in range(len(self.layers))
                for v, e in zip(values[i], experts[i], strict=True)
            ]
        values, flat = scores.reshape(-1).topk(min(n, scores.numel()))
        return [
            (self.layers[int(f) // self.num_experts], int(f) % self.num_experts, float(v))
            for v, f in zip(values, flat, strict=True)
        ]

    def _check(self, name: str, metric: str) -> Tensor:
        if name not in self.maps:
            raise KeyError(f"no prompt set {name!r}; the profile has {self.names}")
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
        return self.maps[name][metric]

    def to_dict(self) -> dict[str, Any]:
        contrasts = (
            {n: {m: self.contrast(n, m).tolist() for m in METRICS} for n in self.names}
            if len(self.names) > 1
            else {}
        )
        return {
            "layers": self.layers,
            "num_experts": self.num_experts,
            "sets": {
                n: {
                    "prompts": self.prompts[n],
                    "tokens": self.tokens[n],
                    **{m: self.maps[n][m].tolist() for m in METRICS},
                }
                for n in self.names
            },
            "contrast": contrasts,
        }

    def save_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, (json.dumps(self.to_dict(), indent=1) + "\n").encode())
        return path

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingProfile:
        sets = data["sets"]
        return cls(
            layers=list(data["layers"]),
            num_experts=int(data["num_experts"]),
            maps={n: {m: torch.tensor(s[m]) for m in METRICS} for n, s in sets.items()},
            prompts={n: int(s["prompts"]) for n, s in sets.items()},
            tokens={n: int(s["tokens"]) for n, s in sets.items()},
        )


def profile_routing(
    model, prompt_sets: Mapping[str, Iterable], layers: Iterable[int] | None = None
) -> RoutingProfile:
    """Run every prompt set through ``model`` and profile its routing (see module doc).

    ``prompt_sets`` maps a set name to its prompts (token ids: a tensor [S] or [B, S] or an
    iterable of them; each row is one prompt). Works on gatelab and HF models alike.
    """
    if not isinstance(prompt_sets, Mapping) or not prompt_sets:
        raise ValueError("prompt_sets must be a non-empty {name: prompts} mapping")
    blocks = select_blocks(model, layers)
    batches = {name: prompt_batches(model, p, name) for name, p in prompt_sets.items()}
    num_experts = blocks[0].num_experts
    if any(b.num_experts != num_experts for b in blocks):
        raise ValueError("profile_routing needs the same num_experts in every profiled layer")
    maps, prompts, tokens = {}, {}, {}
    for name, items in batches.items():
        sums = torch.zeros(2, len(blocks), num_experts, dtype=torch.float64)
        with capture_routing(blocks) as cap:
            for ids in items:
                cap.clear()
                forward_ids(model, ids)
                for i, block in enumerate(blocks):
                    sums[:, i] += _per_prompt(cap.routing(block.layer), ids.shape, num_experts)
        count = sum(ids.shape[0] for ids in items)
        maps[name] = {m: (sums[j] / count).float() for j, m in enumerate(METRICS)}
        prompts[name] = count
        tokens[name] = sum(ids.numel() for ids in items)
    return RoutingProfile([b.layer for b in blocks], num_experts, maps, prompts, tokens)


def _per_prompt(routing, shape: torch.Size, num_experts: int) -> Tensor:
    """[2, E]: per-prompt frequency and mean weight of one batch, summed over its prompts."""
    batch, seq = shape
    valid = routing.valid.cpu()
    experts = routing.experts.cpu().clamp_min(0)
    weights = routing.weights.detach().cpu().double()
    hits = torch.zeros(batch * seq, num_experts + 1, dtype=torch.float64)
    index = torch.where(valid, experts, num_experts)
    hits.scatter_add_(1, index, valid.double())
    gate = torch.zeros_like(hits).scatter_add_(1, index, weights * valid)
    per_prompt = torch.stack([hits[:, :num_experts], gate[:, :num_experts]])
    return per_prompt.view(2, batch, seq, num_experts).mean(dim=2).sum(dim=1)


__all__ = ["METRICS", "RoutingProfile", "profile_routing"]
