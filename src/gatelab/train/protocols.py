"""What the trainer assumes of a model and its batches: how to call the model, what it
returns, how many tokens a batch holds, how a batch reaches the model's device; and which
of the model's parameters AdamW decays."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["call_model", "count_tokens", "losses", "moe_aux_loss", "param_groups", "to_device"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on weight matrices and expert banks only.

    No decay on biases (names ending in ``bias``, which includes expert-bank biases), on
    vectors and scalars (norm gains, gates) or on ``nn.Embedding`` weights (a tied output
    projection shares the embedding's parameter and so is not decayed either): shrinking
    these toward 0 regularises nothing useful and hurts rare tokens (as in GPT-2/nanoGPT,
    OLMo). Router weights are matrices and are decayed.
    """
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith("bias") or id(p) in embeddings:
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def moe_aux_loss(model: nn.Module) -> Tensor:
    """The sum of ``aux_loss`` over a model's MoE layers after a forward (0 when none); a model
    may return it as its ``aux_loss``."""
    losses = [m.aux_loss for m in model.modules() if hasattr(m, "aux_losses")]
    if not losses:
        return torch.zeros(())
    return torch.stack([loss.reshape(()) for loss in losses]).sum()


def _first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("input_ids", "tokens", "idx", "x", "inputs"):
            if isinstance(batch.get(key), Tensor):
                return batch[key]
        values = list(batch.values())
    elif isinstance(batch, list | tuple):
        values = list(batch)
    else:
        return None
    for value in values:
        found = _first_tensor(value)
        if found is not None:
            return found
    return None


def count_tokens(batch: Any) -> int:
    """Tokens in a batch for tokens/s: all elements of the first integer tensor (token ids);
    for float inputs, the number of samples (its first dimension)."""
    t = _first_tensor(batch)
    if t is None:
        return 0
    if t.is_floating_point() or t.is_complex():
        return int(t.shape[0]) if t.dim() else 1
    return t.numel()


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor on ``device`` (nested dicts, tuples, lists, NamedTuples)."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, Mapping):
        return type(batch)({k: to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a NamedTuple
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def call_model(model: nn.Module, batch: Any) -> Any:
    """The default forward: a dict batch as keywords, a tuple or list as arguments."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, tuple | list):
        return model(*batch)
    return model(batch)


def losses(out: Any) -> tuple[Tensor, Tensor | None]:
    """``(loss, aux_loss or None)`` of a model's output, checked to be a scalar loss."""
    if isinstance(out, Tensor):
        loss, aux = out, None
    elif isinstance(out, Mapping):
        loss, aux = out.get("loss"), out.get("aux_loss")
    else:
        loss, aux = getattr(out, "loss", None), getattr(out, "aux_loss", None)
    if not isinstance(loss, Tensor):
        raise TypeError(
            "the model's forward must return the loss: a scalar tensor, a dict with 'loss' or "
            f"an object with .loss (got {type(out).__name__}); do training batches carry targets?"
        )
    if loss.dim() != 0:
        raise ValueError(
            f"the loss must be a scalar (a mean over the batch), got shape {tuple(loss.shape)}"
        )
    return loss, aux
