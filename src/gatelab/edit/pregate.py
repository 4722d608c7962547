"""Pre-gates: predict the next MoE layer's experts from this layer's input (Pre-gated MoE).

After "Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert
Inference" (Hwang et al., ISCA 2024, arXiv 2308.12066): the gate in MoE block l takes block
l's input and selects the experts of block l+1, so those experts can be copied to the compute
device while block l runs (see :mod:`gatelab.edit.offload`).

Departures from the paper, and why:

- The paper *replaces* each router by its pre-gate and fine-tunes the model with it, which
  changes the model. Here the real routers stay (outputs unchanged, exactly); a separate
  pre-gate per layer pair is trained by **distillation** from the next router on calibration
  text and only drives prefetching. A wrong guess costs an on-demand load, never accuracy.
- Pre-gate l is a linear map [dim -> E_next] (with bias) from block l's input (the MoE
  block's own input, after the pre-FFN norm) to layer l+1's router logits, initialised with
  layer l+1's router weights (the residual stream changes slowly from one layer to the next,
  so the next router applied early is a good start). Loss: KL(softmax(router logits of l+1)
  || softmax(pre-gate logits)), over all calibration tokens (full-batch Adam).
- The first MoE layer has no earlier block to predict it; its experts load on demand.

The **hit rate** of a pre-gate is the share of layer l+1's chosen (non-empty) slots whose
expert is among the pre-gate's top ``k`` guesses for that token (``k`` = the next layer's
top_k unless given); chance is ``k / E_next``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..inspect.access import capture_routing, find_moe_blocks
from ..inspect.prompts import forward_ids, prompt_batches


class PreGates(nn.Module):
    """One linear pre-gate per MoE layer that has a next MoE layer.

    ``gates[str(l)]`` maps block l's input [T, dim] to logits [T, E] over the experts of
    MoE layer ``next_layer[l]``.
    """

    def __init__(
        self, dims: Mapping[int, int], num_experts: Mapping[int, int], next_layer: Mapping[int, int]
    ):
        super().__init__()
        self.next_layer = {int(a): int(b) for a, b in next_layer.items()}
        self.gates = nn.ModuleDict(
            {str(a): nn.Linear(dims[a], num_experts[b]) for a, b in self.next_layer.items()}
        )

    @classmethod
    def for_model(cls, model) -> PreGates:
        """Pre-gates for every consecutive pair of MoE blocks of ``model``, initialised
        from the next layer's router weights (module doc)."""
        blocks = find_moe_blocks(model)
        if len(blocks) < 2:
            raise ValueError(
                f"pre-gating needs at least 2 MoE layers (one predicts the next); the model "
                f"has {len(blocks)}"
            )
        pairs = {a.layer: b.layer for a, b in zip(blocks, blocks[1:], strict=False)}
        dims = {b.layer: _router_weight(b).shape[1] for b in blocks}
        gates = cls(dims, {b.layer: b.num_experts for b in blocks}, pairs)
        by_layer = {b.layer: b for b in blocks}
        with torch.no_grad():
            for a, b in pairs.items():
                gates.gates[str(a)].weight.copy_(_router_weight(by_layer[b]).float())
                gates.gates[str(a)].bias.zero_()
        return gates

    def forward(self, layer: int, x: Tensor) -> Tensor:
        """Logits [T, E_next] over the experts of ``next_layer[layer]`` for inputs [T, dim]."""
        if layer not in self.next_layer:
            raise KeyError(
                f"no pre-gate for layer {layer}; pre-gated layers: {sorted(self.next_layer)}"
            )
        gate = self.gates[str(layer)]
        return gate(x.to(gate.weight.device, gate.weight.dtype))

    def predict(self, layer: int, x: Tensor, k: int) -> Tensor:
        """The top ``k`` predicted experts of the next layer per token [T, k]."""
        return self(layer, x).topk(k, dim=-1).indices


def _router_weight(block) -> Tensor:
    weight = getattr(block.router, "weight", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"layer {block.layer}: the router has no [num_experts, dim] weight to read "
            f"({type(block.router).__name__}); pre-gates need a linear router"
        )
    return weight.detach()


def collect_pairs(model, prompts, gates: PreGates) -> dict[int, tuple[Tensor, Tensor, Tensor]]:
    """{layer: (block inputs [T, dim], next router logits [T, E], next experts [T, K])}."""
    batches = prompt_batches(model, prompts, "calibration prompts")
    layers = sorted(set(gates.next_layer) | set(gates.next_layer.values()))
    with capture_routing(model, layers=layers, hidden=True, to_cpu=True) as cap:
        for ids in batches:
            forward_ids(model, ids)
        out = {}
        for a, b in gates.next_layer.items():
            r = cap.routing(b)
            out[a] = (cap.input(a).float(), r.logits.float(), r.experts)
    return out


def train_pregates(
    model, prompts, steps: int = 200, lr: float = 1e-2, gates: PreGates | None = None
) -> PreGates:
    """Distil each next router into a pre-gate on ``prompts`` (module doc)."""
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    gates = PreGates.for_model(model) if gates is None else gates
    data = collect_pairs(model, prompts, gates)
    device = next(gates.parameters()).device
    for a, (x, logits, _) in data.items():
        gate = gates.gates[str(a)]
        x, target = x.to(device), logits.log_softmax(-1).to(device)
        opt = torch.optim.Adam(gate.parameters(), lr=lr)
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss = F.kl_div(gate(x).log_softmax(-1), target, log_target=True, reduction="batchmean")
            loss.backward()
            opt.step()
    return gates.eval()


def hit_rate(
    gates: PreGates, data: Mapping[int, tuple[Tensor, Tensor, Tensor]], k: int | None = None
) -> dict[int, dict[str, float]]:
    """Per pre-gated layer: hit rate of its top-k guesses on the next layer's chosen
    experts, and the chance level k / E."""
    out = {}
    with torch.no_grad():
        for a, (x, logits, experts) in data.items():
            kk = k if k is not None else experts.shape[1]
            if not 1 <= kk <= logits.shape[1]:
                raise ValueError(f"k must lie in 1..{logits.shape[1]}, got {kk}")
            guess = gates.predict(a, x.to(next(gates.parameters()).device), kk).cpu()
            valid = experts >= 0
            hit = (experts[:, :, None] == guess[:, None, :]).any(-1) & valid
            out[a] = {
                "hit_rate": float(hit.sum()) / max(int(valid.sum()), 1),
                "chance": kk / logits.shape[1],
                "k": kk,
            }
    return out


def pregate_hit_rate(model, gates: PreGates, prompts, k: int | None = None):
    """:func:`hit_rate` of ``gates`` on ``prompts`` run through ``model``."""
    return hit_rate(gates, collect_pairs(model, prompts, gates), k)


__all__ = ["PreGates", "collect_pairs", "hit_rate", "pregate_hit_rate", "train_pregates"]
