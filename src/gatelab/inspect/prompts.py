"""Prompt sets for the inspection and editing tools: checked token-id batches, one forward,
the next-token loss."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def context_length(model: nn.Module) -> int | None:
    """The longest sequence ``model`` takes: gatelab ``config.max_seq_len``, HF
    ``config.max_position_embeddings``; None when the model says nothing."""
    config = getattr(model, "config", None)
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def vocab_size(model: nn.Module) -> int | None:
    """How many token ids ``model`` embeds: ``config.vocab_size`` (gatelab and HF), else the
    rows of its input embedding; None when neither says."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(value, int) and value > 0:
        return value
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(embed, "num_embeddings", None)


def prompt_batches(model: nn.Module, prompts, name: str = "prompts") -> list[Tensor]:
    """A prompt set as a list of int64 [B, S] tensors, checked against ``model``.

    ``prompts`` is a tensor [S] or [B, S], or an iterable of those (or of lists of ints);
    each row is one prompt. Raises ValueError for an empty set, an empty prompt, a token id
    outside the vocabulary or a prompt longer than the model's context (the message names
    the set and the fix).
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
    _check_vocab(model, batches, name)
    limit = context_length(model)
    longest = max(b.shape[1] for b in batches)
    if limit is not None and longest > limit:
        raise ValueError(
            f"{name}: a prompt has {longest} tokens, longer than the model's context of "
            f"{limit}; cut prompts to at most {limit} tokens"
        )
    return batches


def _check_vocab(model: nn.Module, batches: list[Tensor], name: str) -> None:
    vocab = vocab_size(model)
    low = min(int(b.min()) for b in batches)
    high = max(int(b.max()) for b in batches)
    if low < 0 or (vocab is not None and high >= vocab):
        raise ValueError(
            f"{name}: token ids must lie in [0, {vocab if vocab is not None else 'vocab'}), the "
            f"model's vocabulary; got ids from {low} to {high}"
        )


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


__all__ = ["context_length", "forward_ids", "next_token_loss", "prompt_batches", "vocab_size"]
