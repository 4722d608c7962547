"""Classifiers made from a pretrained byte-level LM: an MLP head (MLP-FT) vs prompting (MVP).

"Model-tuning Via Prompts Makes NLP Models Adversarially Robust" (Raman, Maini, Kolter,
Lipton, Pruthi; arXiv 2303.07320) compares two ways of turning a pretrained LM into a
classifier, both fine-tuned end to end with cross-entropy:

- **MLP-FT** (:class:`MLPHeadClassifier`): a randomly initialised MLP on the model's
  representation (the paper: RoBERTa's head on the CLS token).
- **MVP** (:class:`PromptClassifier`): append a prompt template to the input and classify by
  the LM's own scores of verbaliser words at the completion; no new parameters.

The paper finds MVP markedly more robust to adversarial substitutions (+8 points on average)
and that adversarial training helps both (:class:`AdversarialLoss`, with the attack of
:mod:`gatelab.adapt.text_attack`).

Departures (a causal byte-level LM, not a masked word-piece model):

- MLP-FT pools the final normed hidden state by the **mean over the input bytes** (a causal LM
  has no CLS token; the last position sees everything but alone is noisier). The head is
  RoBERTa's: dropout, dense dim -> dim, tanh, dropout, dense dim -> classes.
- MVP's "infilling" is **completion**: a class's score is the summed log-probability of its
  verbaliser's bytes after ``input + template`` (teacher-forced), one sequence per class.
  Multi-byte verbalisers of different lengths are scored by the sum, as the paper's
  multi-token verbalisers are; fine-tuning calibrates the length bias. With several templates
  the scores are averaged (the paper averages over four templates; the default here is one,
  for cost).
- Adversarial training trains on greedy character substitutions found on the fly (the paper
  uses adversarial examples from its attacks too, among other variants).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .text_attack import greedy_substitution_attack

__all__ = [
    "AdversarialLoss",
    "MLPHeadClassifier",
    "PromptClassifier",
    "accuracy",
    "classification_loss",
]


def _check_ids(ids: Tensor) -> None:
    if not isinstance(ids, Tensor) or ids.dim() != 2 or ids.dtype.is_floating_point:
        shape = tuple(ids.shape) if isinstance(ids, Tensor) else type(ids).__name__
        raise ValueError(f"ids must be an integer tensor [batch, length], got {shape}")


class MLPHeadClassifier(nn.Module):
    """MLP-FT: a random MLP head on the LM's mean-pooled final hidden state.

    ``lm`` is a gatelab ``LM`` (it needs ``.norm``, the final norm whose output the head
    reads, and ``.config.dim``); ``forward(ids [B, L]) -> logits [B, num_classes]``.
    """

    def __init__(self, lm: nn.Module, num_classes: int, dropout: float = 0.1):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.lm = lm
        dim = lm.config.dim
        self.head = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(dim, dim), nn.Tanh(), nn.Dropout(dropout)
        )
        self.out = nn.Linear(dim, num_classes)

    def hidden(self, ids: Tensor) -> Tensor:
        """ids [B, L] -> the final normed hidden state [B, L, dim] (a hook on ``lm.norm``)."""
        caught: list[Tensor] = []
        handle = self.lm.norm.register_forward_hook(lambda _m, _i, out: caught.append(out))
        try:
            self.lm(ids)
        finally:
            handle.remove()
        return caught[0]

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids(ids)
        pooled = self.hidden(ids).mean(1)  # [B, dim]
        return self.out(self.head(pooled))


class PromptClassifier(nn.Module):
    """MVP: classify ``input + template`` by the LM's log-probability of each verbaliser.

    ``verbalisers``: one string per class (e.g. ``("prose", "code")``), encoded as UTF-8
    bytes; ``templates``: strings appended to the input (scores averaged over them).
    ``forward(ids [B, L]) -> logits [B, C]``, logit = summed log-prob of the verbaliser bytes.
    """

    def __init__(
        self,
        lm: nn.Module,
        verbalisers: Sequence[str],
        templates: Sequence[str] = (" This is ",),
    ):
        super().__init__()
        if len(verbalisers) < 2 or len(set(verbalisers)) != len(verbalisers):
            raise ValueError(f"verbalisers must be >= 2 distinct strings, got {verbalisers!r}")
        if not templates or any(not v for v in verbalisers):
            raise ValueError("give at least one template and non-empty verbalisers")
        self.lm = lm
        self.verbalisers = [tuple(v.encode("utf-8")) for v in verbalisers]
        self.templates = [tuple(t.encode("utf-8")) for t in templates]

    def extra_length(self) -> int:
        """Bytes added to the input: the longest template plus the longest verbaliser."""
        return max(map(len, self.templates)) + max(map(len, self.verbalisers))

    def _template_scores(self, ids: Tensor, template: tuple[int, ...]) -> Tensor:
        b, n = ids.shape
        c = len(self.verbalisers)
        prefix = torch.cat([ids, ids.new_tensor(template).expand(b, -1)], 1)  # [B, P]
        p = prefix.shape[1]
        width = max(map(len, self.verbalisers))
        seqs = prefix.new_zeros(c, b, p + width)  # class-major; right padding is masked
        mask = torch.zeros(c, b, p + width, dtype=torch.bool)
        target = torch.zeros(c, b, width, dtype=torch.long)
        tmask = torch.zeros(c, 1, width)
        for k, v in enumerate(self.verbalisers):
            seqs[k, :, :p] = prefix
            seqs[k, :, p : p + len(v)] = ids.new_tensor(v)
            mask[k, :, : p + len(v)] = True
            target[k, :, : len(v)] = torch.tensor(v)
            tmask[k, 0, : len(v)] = 1.0
        logits = self.lm(seqs.flatten(0, 1), token_mask=mask.flatten(0, 1)).logits
        # the byte at position p + j is predicted at position p + j - 1
        logp = F.log_softmax(logits[:, p - 1 : p + width - 1].float(), -1).view(c, b, width, -1)
        picked = logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)  # [C, B, width]
        return (picked * tmask).sum(-1).T  # [B, C]

    def forward(self, ids: Tensor) -> Tensor:
        _check_ids(ids)
        scores = [self._template_scores(ids, t) for t in self.templates]
        return torch.stack(scores).mean(0)


def classification_loss(classifier: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """Cross-entropy of ``classifier`` on a batch ``(ids [B, L], labels [B])``."""
    ids, labels = batch
    return F.cross_entropy(classifier(ids), labels)


class AdversarialLoss:
    """Adversarial training's loss: ``(1 - w) * CE(clean) + w * CE(attacked)``.

    Each call attacks the batch with the current model (eval mode, no gradients) by
    :func:`~gatelab.adapt.text_attack.greedy_substitution_attack` with ``attack`` (its
    keyword arguments: a cheaper budget than the evaluation's), then trains on both the
    clean and the attacked copies. The attack seed advances with every call, so each step
    draws fresh candidates, deterministically.
    """

    def __init__(self, attack: dict, weight: float = 0.5, seed: int = 0):
        if not 0 <= weight <= 1:
            raise ValueError(f"weight must be in [0, 1], got {weight}")
        self.attack = dict(attack)
        self.weight = weight
        self.seed = seed
        self.calls = 0

    def __call__(self, classifier: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
        ids, labels = batch
        classifier.eval()
        adv = greedy_substitution_attack(
            classifier, ids, labels, seed=self.seed * 1_000_003 + self.calls, **self.attack
        ).ids
        classifier.train()
        self.calls += 1
        logits = classifier(torch.cat([ids, adv]))
        clean, attacked = logits.split(ids.shape[0])
        return (1 - self.weight) * F.cross_entropy(clean, labels) + self.weight * F.cross_entropy(
            attacked, labels
        )


@torch.no_grad()
def accuracy(classifier: nn.Module, ids: Tensor, labels: Tensor, chunk: int = 256) -> float:
    """Fraction of ``ids`` [N, L] that ``classifier`` (in eval mode) labels correctly."""
    was = classifier.training
    classifier.eval()
    pred = torch.cat([classifier(part).argmax(-1) for part in ids.split(chunk)])
    classifier.train(was)
    return float((pred == labels).float().mean())
