"""Read MLP outputs and single neurons through the unembedding (the factual-recall read-out).

An MLP (or expert) writes vectors into the residual stream; projecting such a vector
through the model's unembedding says which next tokens it promotes. This is the "logit
lens" applied to one layer's contribution, as used to read factual-recall MLPs ("Locating
and Editing Factual Associations in GPT", Meng et al., arXiv 2202.05262; "Transformer
Feed-Forward Layers Are Key-Value Memories", Geva et al., arXiv 2012.14913: a neuron's output
weights, read through the unembedding, name the tokens it promotes).

Choice (documented, tested): the final norm is applied to the vector as its elementwise
gain only (``norm.weight * v``), without the per-token RMS/LayerNorm rescaling, because a
single contribution is a direction, not a residual state: scale-free, and the gain is the
part of the norm that changes which tokens rank first. Pass ``gain=False`` for the raw
``W_U v``.

Works on gatelab LMs (``embed`` tied head, ``norm``) and HF causal LMs
(``get_output_embeddings()``, ``model.norm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .access import find_moe_blocks
from .prompts import forward_ids, prompt_batches


def unembedding(model: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W_U [V, D], the final norm's gain [D] or None) of a gatelab or HF causal LM."""
    head = getattr(model, "lm_head_weight", None)
    norm = getattr(model, "norm", None)
    if head is None and hasattr(model, "get_output_embeddings"):
        out = model.get_output_embeddings()
        head = getattr(out, "weight", None)
        norm = getattr(getattr(model, "model", None), "norm", None)
    if not isinstance(head, Tensor):
        raise ValueError(
            f"{type(model).__name__} has no unembedding to read through: expected a gatelab "
            "LM (lm_head_weight) or an HF causal LM (get_output_embeddings())"
        )
    gain = getattr(norm, "weight", None)
    return head.detach(), gain.detach() if isinstance(gain, Tensor) else None


@dataclass
class Readout:
    """Top tokens per read vector: ``tokens`` [N, k] ids, ``logits`` [N, k] their logits."""

    tokens: Tensor
    logits: Tensor

    def decoded(self, decode=None) -> list[list[str]]:
        """Tokens as text (bytes for gatelab's byte LMs unless ``decode`` is given)."""
        decode = decode or _byte
        return [[decode(int(t)) for t in row] for row in self.tokens]


def _byte(token: int) -> str:
    return repr(bytes([token]).decode("latin-1")) if token < 256 else f"<{token}>"


def read_vectors(model: nn.Module, vectors: Tensor, k: int = 10, gain: bool = True) -> Readout:
    """The ``k`` tokens each vector [N, D] (or [D]) promotes most through the unembedding."""
    w_u, g = unembedding(model)
    vectors = vectors.reshape(-1, vectors.shape[-1]) if vectors.dim() else vectors
    if vectors.dim() != 2 or vectors.shape[1] != w_u.shape[1]:
        raise ValueError(
            f"vectors must be [N, {w_u.shape[1]}] (the model's width), got {tuple(vectors.shape)}"
        )
    if not 1 <= k <= w_u.shape[0]:
        raise ValueError(f"k must lie in 1..{w_u.shape[0]} (the vocabulary), got {k}")
    v = vectors.to(w_u.dtype).to(w_u.device)
    if gain and g is not None:
        v = v * g
    top = (v @ w_u.T).topk(k, dim=-1)
    return Readout(top.indices.cpu(), top.values.float().cpu())


def expert_neurons(model: nn.Module, layer: int, expert: int) -> Tensor:
    """The output directions [F, D] of every neuron of one expert (columns of its down
    projection): what each neuron writes into the residual stream per unit activation."""
    blocks = {b.layer: b for b in find_moe_blocks(model)}
    if layer not in blocks:
        raise ValueError(f"layer {layer} has no MoE block; the MoE layers are {sorted(blocks)}")
    block = blocks[layer]
    if not 0 <= expert < block.num_experts:
        raise ValueError(f"expert must lie in 0..{block.num_experts - 1}, got {expert}")
    return block.expert_weights().w_out[expert].detach().T


def read_neurons(
    model: nn.Module, layer: int, expert: int, neurons=None, k: int = 10, gain: bool = True
) -> Readout:
    """Top tokens of single neurons of an expert (all of them unless ``neurons`` given)."""
    directions = expert_neurons(model, layer, expert)
    if neurons is not None:
        idx = torch.as_tensor(list(neurons), dtype=torch.long)
        if idx.numel() and (idx.min() < 0 or idx.max() >= directions.shape[0]):
            raise ValueError(
                f"neurons must lie in 0..{directions.shape[0] - 1}, got {idx.tolist()}"
            )
        directions = directions[idx]
    return read_vectors(model, directions, k, gain)


def module_io(model: nn.Module, module: nn.Module, prompts) -> tuple[Tensor, Tensor]:
    """The input and output [T, D] of ``module`` over every token of ``prompts``."""
    xs, ys = [], []

    def hook(mod, args, kwargs, output):
        x = args[0] if args else next(iter(kwargs.values()))
        y = output[0] if isinstance(output, tuple) else output
        if not all(isinstance(t, Tensor) and t.is_floating_point() for t in (x, y)):
            raise ValueError(
                f"{type(mod).__name__} does not map activations to activations (its input or "
                "output is not a float tensor); choose an MLP or MoE block"
            )
        xs.append(x.detach().reshape(-1, x.shape[-1]).float().cpu())
        ys.append(y.detach().reshape(-1, y.shape[-1]).float().cpu())

    handle = module.register_forward_hook(hook, with_kwargs=True)
    try:
        for ids in prompt_batches(model, prompts, "prompts"):
            forward_ids(model, ids)
    finally:
        handle.remove()
    return torch.cat(xs), torch.cat(ys)


def layer_outputs(model: nn.Module, module: nn.Module, prompts) -> tuple[Tensor, Tensor]:
    """(module output [T, D], the prompts' token ids [T]) over every prompt token."""
    batches = prompt_batches(model, prompts, "prompts")
    _, y = module_io(model, module, batches)
    return y, torch.cat([b.reshape(-1) for b in batches])


def readout_accuracy(
    model: nn.Module, module: nn.Module, prompts, k: int = 1, gain: bool = True
) -> dict[str, float]:
    """How often the module's own output, read through the unembedding, has the actual next
    token among its top ``k``; with the rate a frequency-only guess (the ``k`` most common
    next tokens of these prompts) gets, as the floor to compare against."""
    batches = prompt_batches(model, prompts, "prompts")
    y, _ = layer_outputs(model, module, batches)
    seq = batches[0].shape[1]
    if any(b.shape[1] != seq for b in batches) or seq < 2:
        raise ValueError("readout_accuracy needs prompts of one length >= 2")
    y = y.reshape(-1, seq, y.shape[-1])[:, :-1].reshape(-1, y.shape[-1])
    targets = torch.cat([b[:, 1:].reshape(-1) for b in batches])
    top = read_vectors(model, y, k, gain).tokens
    hit = (top == targets[:, None]).any(-1).float().mean()
    common = torch.bincount(targets).topk(min(k, int(targets.max()) + 1)).indices
    floor = torch.isin(targets, common).float().mean()
    return {
        "accuracy": float(hit),
        "frequency_floor": float(floor),
        "k": k,
        "tokens": int(targets.numel()),
    }


__all__ = [
    "Readout",
    "expert_neurons",
    "layer_outputs",
    "module_io",
    "read_neurons",
    "read_vectors",
    "readout_accuracy",
    "unembedding",
]
