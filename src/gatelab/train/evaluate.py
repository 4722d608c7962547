"""Evaluation of language models on the byte corpus: bits per byte, per domain."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..data.text import DOMAINS, IGNORE_INDEX, LMBatch


@torch.no_grad()
def bits_per_byte(model: nn.Module, batches: Iterable[LMBatch]) -> dict[str, dict[str, float]]:
    """Cross entropy in bits per byte and the target count, per domain.

    Every target that is not ``IGNORE_INDEX`` counts with its ``domains`` entry: bits per
    byte = summed cross entropy in nats / (targets * ln 2), one byte per target (a
    document's closing EOS counts as one byte of its domain). NaN for a domain with no
    target. ``model(inputs).logits`` must give [B, S, vocab].
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    nats = torch.zeros(len(DOMAINS), dtype=torch.float64)
    count = torch.zeros(len(DOMAINS), dtype=torch.int64)
    for batch in batches:
        logits = model(batch.inputs.to(device)).logits.float().cpu()
        per_token = F.cross_entropy(
            logits.flatten(0, 1),
            batch.targets.flatten(),
            ignore_index=IGNORE_INDEX,
            reduction="none",
        ).double()
        domains = batch.domains.flatten()
        real = (batch.targets.flatten() != IGNORE_INDEX) & (domains >= 0)
        nats.index_add_(0, domains[real], per_token[real])
        count += torch.bincount(domains[real], minlength=len(DOMAINS))
    model.train(was_training)
    return {
        domain: {
            "bits_per_byte": float(nats[i] / (count[i] * math.log(2))) if count[i] else math.nan,
            "tokens": int(count[i]),
        }
        for i, domain in enumerate(DOMAINS)
    }
