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

:func:`profile_labels` profiles by token label instead of by prompt (``gatelab demo``: each
token's domain, prose or code): per layer, the routed slots (a token's filled top-k slots)
each expert receives from each label, and their shares (each label's row sums to 1).
:func:`divergence` scores how differently two labels use the experts (Jensen-Shannon
divergence in bits and total variation).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..io import atomic_write
from .access import capture_routing, select_blocks
from .prompts import forward_ids, prompt_batches

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


# -- routed-slot shares per token label ---------------------------------------------------------


def slot_counts(experts: Tensor, labels: Tensor, num_labels: int, num_experts: int) -> Tensor:
    """[num_labels, E] int64: routed slots per (label, expert).

    experts: [T, K] a Routing's expert ids (-1: an empty slot, not counted).
    labels: [T] each token's label id (-1: not counted, e.g. padding).
    """
    if experts.dim() != 2 or labels.shape != experts.shape[:1]:
        raise ValueError(
            f"slot_counts takes experts [T, K] and labels [T], got {tuple(experts.shape)} "
            f"and {tuple(labels.shape)}"
        )
    labels = labels.to(experts.device).long()
    slot_label = labels[:, None].expand_as(experts)
    valid = (experts >= 0) & (slot_label >= 0)
    index = slot_label[valid] * num_experts + experts[valid]
    counts = torch.bincount(index, minlength=num_labels * num_experts)
    return counts.view(num_labels, num_experts).cpu()


def slot_shares(counts: Tensor) -> Tensor:
    """counts [..., G, E] -> shares float64, each row divided by its sum (zeros if none)."""
    counts = counts.double()
    return counts / counts.sum(dim=-1, keepdim=True).clamp_min(1)


def divergence(p: Tensor, q: Tensor) -> dict[str, float]:
    """How differently two share rows p, q [E] use the experts.

    ``jsd_bits``: Jensen-Shannon divergence in bits, (KL(p||m) + KL(q||m)) / 2 with
    m = (p + q) / 2; in [0, 1], 0 for identical rows, 1 for disjoint experts.
    ``total_variation``: sum |p - q| / 2, the share of slots that would have to move for the
    rows to match; also in [0, 1].
    """
    p, q = p.double(), q.double()
    m = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> float:
        return float((torch.special.xlogy(a, a) - torch.special.xlogy(a, b)).sum()) / math.log(2)

    return {
        "jsd_bits": max(0.0, (kl(p, m) + kl(q, m)) / 2),
        "total_variation": float((p - q).abs().sum() / 2),
    }


@dataclass
class LabelProfile:
    """``counts`` [L, G, E] int64: routed slots per layer (rows follow ``layers``), label
    (``labels``) and expert; ``names`` are the blocks' module names."""

    layers: list[int]
    names: list[str]
    labels: list[str]
    counts: Tensor

    def shares(self) -> Tensor:
        """[L, G, E] float64: each label's share of its routed slots per expert."""
        return slot_shares(self.counts)

    def divergence(self, a: str, b: str) -> list[dict[str, float]]:
        """Per layer, :func:`divergence` of label ``a``'s shares and label ``b``'s."""
        shares, i, j = self.shares(), self.labels.index(a), self.labels.index(b)
        return [divergence(layer[i], layer[j]) for layer in shares]

    def leaning(self, a: str, b: str) -> list[tuple[int, float, float]]:
        """Per layer, the expert whose share of ``a``'s slots exceeds its share of ``b``'s
        the most: (expert, share of a, share of b).

        By difference, not ratio: a ratio makes an expert neither label uses (0 / 0) or
        one ``b`` never uses (x / 0) the winner whatever its share.
        """
        shares, i, j = self.shares(), self.labels.index(a), self.labels.index(b)
        out = []
        for layer in shares:
            e = int((layer[i] - layer[j]).argmax())
            out.append((e, float(layer[i, e]), float(layer[j, e])))
        return out

    def to_rows(self) -> list[dict[str, Any]]:
        """JSON-able, one dict per layer: counts and shares per label."""
        shares = self.shares()
        return [
            {
                "layer": layer,
                "name": name,
                "counts": {g: self.counts[i, k].tolist() for k, g in enumerate(self.labels)},
                "shares": {g: shares[i, k].tolist() for k, g in enumerate(self.labels)},
            }
            for i, (layer, name) in enumerate(zip(self.layers, self.names, strict=True))
        ]

    def compare(
        self, a: str, b: str, reference: LabelProfile | None = None
    ) -> list[dict[str, Any]]:
        """:meth:`to_rows` with, per layer, the divergence of ``a`` and ``b`` (``jsd_bits``,
        ``total_variation``), the expert leaning most to ``a`` (``leaning``: expert and its
        shares of ``a`` and ``b``) and the shares and divergence of a ``reference`` profile
        of the same model (``reference``, e.g. the model before training)."""
        rows = self.to_rows()
        ref_rows = reference.to_rows() if reference is not None else None
        ref_scores = reference.divergence(a, b) if reference is not None else None
        for i, (row, scores) in enumerate(zip(rows, self.divergence(a, b), strict=True)):
            expert, share_a, share_b = self.leaning(a, b)[i]
            row.update(scores, leaning={"expert": expert, a: share_a, b: share_b})
            if ref_rows is not None:
                row["reference"] = {"shares": ref_rows[i]["shares"], **ref_scores[i]}
        return rows


def profile_labels(
    model,
    batches: Iterable[tuple[Tensor, Tensor]],
    labels: Sequence[str],
    layers: Iterable[int] | None = None,
) -> LabelProfile:
    """Routed slots per (layer, label, expert) over ``batches`` of (ids [B, S], token labels
    [B, S]: an index into ``labels``, -1 for tokens not to count).

    The model runs in eval mode (restored afterwards); wrap ``batches`` in a progress bar to
    show one. Works on gatelab and HF models alike (through :func:`capture_routing`).
    """
    blocks = select_blocks(model, layers)
    if len({b.num_experts for b in blocks}) != 1:
        raise ValueError("profile_labels needs the same num_experts in every profiled layer")
    counts = [torch.zeros(len(labels), b.num_experts, dtype=torch.int64) for b in blocks]
    was_training = model.training
    model.eval()
    try:
        with capture_routing(blocks) as cap:
            for ids, token_labels in batches:
                cap.clear()
                forward_ids(model, ids)
                flat = token_labels.reshape(-1)
                for i, block in enumerate(blocks):
                    experts = cap.routing(block.layer).experts
                    counts[i] += slot_counts(experts, flat, len(labels), block.num_experts)
    finally:
        model.train(was_training)
    return LabelProfile(
        [b.layer for b in blocks], [b.name for b in blocks], list(labels), torch.stack(counts)
    )


__all__ = [
    "METRICS",
    "LabelProfile",
    "RoutingProfile",
    "divergence",
    "profile_labels",
    "profile_routing",
    "slot_counts",
    "slot_shares",
]
