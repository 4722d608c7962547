"""A character-substitution attack on byte-level classifiers: greedy, budgeted, query-bounded.

Written for the MVP comparison (:mod:`gatelab.adapt.mvp`; "Model-tuning Via Prompts Makes NLP
Models Adversarially Robust", Raman et al., arXiv 2303.07320), whose attacks (TextFooler,
TextBugger, BAE, BERT-Attack) are word- and character-level substitutions chosen greedily by
how much they lower the true class's score. Ours is the character-level member of that family
(closest to DeepWordBug / TextBugger's character edits), on raw bytes:

- an attack edits at most ``max_edits`` distinct positions of the input (each position once);
- at each step it scores every candidate substitution (position, byte) of the candidate set
  and applies the one that most lowers the **margin** (the true class's logit minus the
  largest other logit); it stops for an example once the margin is negative (the prediction
  flipped), when no candidate lowers the margin, or when the budget is spent;
- **query bound**: when an example has more than ``queries_per_step`` candidates, a seeded
  random subset of that size is scored (so the search is greedy over a sampled neighbourhood,
  as black-box attacks with a query budget are); with no bound it is exact greedy;
- deterministic: the subset drawn for example ``i`` at step ``t`` depends only on
  ``(seed, i, t)``, not on the batch it is attacked in.

Candidate sets (``candidates``):

- ``"keyboard"`` (default): the QWERTY neighbours of the byte (left, right, and the keys
  above and below in the same column), its shift flip (``a``<->``A``, ``1``<->``!``,
  ``[``<->``{``: case flips included) and visually similar characters (``o``<->``0``,
  ``l``<->``1``, ``s``<->``$``, ...). Bytes off the keyboard (space, newline, tab, non-ASCII)
  have no candidates and are never edited.
- ``"printable"``: every printable ASCII byte (32..126) other than the current one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "AttackResult",
    "CANDIDATE_SETS",
    "candidate_bytes",
    "edit_budget",
    "greedy_substitution_attack",
    "margins",
]

_ROWS = ("1234567890-=", "qwertyuiop[]", "asdfghjkl;'", "zxcvbnm,./")
_SHIFTED = ("!@#$%^&*()_+", "QWERTYUIOP{}", 'ASDFGHJKL:"', "ZXCVBNM<>?")
_LOOKALIKE = {
    "o": "0",
    "0": "oO",
    "O": "0",
    "l": "1I|",
    "1": "lI",
    "I": "l1",
    "i": "1!",
    "e": "3",
    "a": "@",
    "s": "$5",
    "S": "5$",
    "t": "7",
    "b": "6",
    "g": "9",
    "z": "2",
    "B": "8",
}
CANDIDATE_SETS = ("keyboard", "printable")


def _keyboard_table() -> dict[int, tuple[int, ...]]:
    where = {}
    for rows in (_ROWS, _SHIFTED):
        for r, row in enumerate(rows):
            for c, ch in enumerate(row):
                where[ch] = (rows, r, c)
    table: dict[int, tuple[int, ...]] = {}
    for ch, (rows, r, c) in where.items():
        near = [rows[r][c + d] for d in (-1, 1) if 0 <= c + d < len(rows[r])]
        near += [rows[r + d][c] for d in (-1, 1) if 0 <= r + d < len(rows) and c < len(rows[r + d])]
        other = _SHIFTED if rows is _ROWS else _ROWS
        near.append(other[r][c])  # shift flip: case flips for letters
        near += list(_LOOKALIKE.get(ch, ""))
        table[ord(ch)] = tuple(sorted({ord(n) for n in near} - {ord(ch)}))
    return table


_KEYBOARD = _keyboard_table()
_PRINTABLE = tuple(range(32, 127))


def candidate_bytes(byte: int, candidates: str = "keyboard") -> tuple[int, ...]:
    """The bytes ``byte`` may be replaced by under the candidate set (sorted, without it)."""
    if candidates == "keyboard":
        return _KEYBOARD.get(int(byte), ())
    if candidates == "printable":
        return tuple(b for b in _PRINTABLE if b != int(byte))
    raise ValueError(f"candidates must be one of {CANDIDATE_SETS}, got {candidates!r}")


def edit_budget(length: int, fraction: float) -> int:
    """Edits allowed on ``length`` characters at ``fraction`` of them (at least one)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    return max(1, math.floor(fraction * length))


def margins(logits: Tensor, labels: Tensor) -> Tensor:
    """[N, C], [N] -> [N]: the true class's logit minus the largest other logit."""
    true = logits.gather(1, labels[:, None]).squeeze(1)
    other = logits.scatter(1, labels[:, None], float("-inf")).amax(1)
    return true - other


@dataclass
class AttackResult:
    """Per example: the attacked inputs [N, L], edits made, queries spent, final margin,
    and whether the prediction flipped (margin < 0; examples misclassified before any edit
    count as flipped with 0 edits)."""

    ids: Tensor
    edits: Tensor
    queries: Tensor
    margin: Tensor
    flipped: Tensor


def _candidates(
    orig: Tensor, cur: Tensor, edited: set[int], kind: str, bound: int | None, gen: torch.Generator
) -> list[tuple[int, int]]:
    """(position, byte) pairs open to example at this step, subsampled to ``bound``."""
    pairs = [
        (p, b)
        for p in range(orig.numel())
        if p not in edited
        for b in candidate_bytes(int(orig[p]), kind)
        if b != int(cur[p])
    ]
    if bound is not None and len(pairs) > bound:
        keep = torch.randperm(len(pairs), generator=gen)[:bound].sort().values
        pairs = [pairs[i] for i in keep.tolist()]
    return pairs


@torch.no_grad()
def _score(score_fn: Callable[[Tensor], Tensor], ids: Tensor, chunk: int) -> Tensor:
    return torch.cat([score_fn(part).float() for part in ids.split(chunk)])


@torch.no_grad()
def greedy_substitution_attack(
    score_fn: Callable[[Tensor], Tensor],
    ids: Tensor,
    labels: Tensor,
    *,
    max_edits: int,
    candidates: str = "keyboard",
    queries_per_step: int | None = None,
    seed: int = 0,
    chunk: int = 256,
) -> AttackResult:
    """Attack ``score_fn`` (ids [n, L] int64 -> logits [n, C]) on ``ids`` [N, L] with true
    ``labels`` [N]; see the module docstring. The first clean scoring counts as one query
    per example."""
    _check_attack(ids, labels, max_edits, queries_per_step, candidates)
    ids, labels = ids.long(), labels.long()
    cur = ids.clone()
    n = ids.shape[0]
    margin = margins(_score(score_fn, cur, chunk), labels) if n else torch.zeros(0)
    queries = torch.ones(n, dtype=torch.long)
    edits = torch.zeros(n, dtype=torch.long)
    edited: list[set[int]] = [set() for _ in range(n)]
    stuck = torch.zeros(n, dtype=torch.bool)  # no candidate of the full set helps any more
    for step in range(max_edits):
        active = [i for i in range(n) if margin[i] >= 0 and not stuck[i]]
        pairs = {}
        for i in active:
            gen = torch.Generator().manual_seed(_mix(seed, i, step))
            pairs[i] = _candidates(ids[i], cur[i], edited[i], candidates, queries_per_step, gen)
        active = [i for i in active if pairs[i]]
        if not active:
            break
        trial = torch.cat([cur[i].expand(len(pairs[i]), -1).clone() for i in active])
        owner = torch.cat([torch.full((len(pairs[i]),), i) for i in active])
        flat = [pq for i in active for pq in pairs[i]]
        pos = torch.tensor([p for p, _ in flat])
        trial[torch.arange(len(flat)), pos] = torch.tensor([b for _, b in flat])
        trial_margin = margins(_score(score_fn, trial, chunk), labels[owner])
        start = 0
        for i in active:
            k = len(pairs[i])
            queries[i] += k
            best = int(trial_margin[start : start + k].argmin())
            if trial_margin[start + best] < margin[i]:  # greedy: only edits that help
                p, b = pairs[i][best]
                cur[i, p] = b
                edited[i].add(p)
                edits[i] += 1
                margin[i] = trial_margin[start + best]
            elif queries_per_step is None or k < queries_per_step:
                stuck[i] = True  # every candidate was tried: none will help later either
            start += k
    return AttackResult(cur, edits, queries, margin, margin < 0)


def _check_attack(ids, labels, max_edits, queries_per_step, candidates) -> None:
    if ids.dim() != 2 or labels.shape != ids.shape[:1]:
        raise ValueError(
            f"need ids [N, L] and labels [N], got {tuple(ids.shape)}, {tuple(labels.shape)}"
        )
    if max_edits < 0:
        raise ValueError(f"max_edits must be >= 0, got {max_edits}")
    if queries_per_step is not None and queries_per_step < 1:
        raise ValueError(f"queries_per_step must be >= 1 or None, got {queries_per_step}")
    candidate_bytes(0, candidates)  # validates the name


def _mix(*values: int) -> int:
    h = 0x9E3779B9
    for v in values:
        h = (h * 1_000_003 ^ (int(v) & 0xFFFFFFFF)) & 0x7FFFFFFFFFFF
    return h
