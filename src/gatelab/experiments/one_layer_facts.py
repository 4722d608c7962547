"""Knowledge acquisition and extraction in a one-layer transformer, with and without MLP.

Claim ("Filtering with Self-Attention and Storing with MLP: One-Layer Transformers Can
Provably Acquire and Extract Knowledge", 2025): a one-layer transformer with attention and
an MLP reaches near-optimal pretraining loss on facts (acquisition) and, after fine-tuning
on questions about part of the subjects, answers questions about the other subjects it
saw only in pretraining (extraction), given a large enough fine-tuning set; an
attention-only model may fail at both.

Synthetic facts (:func:`make_facts`): S subjects, R relations, one pool of A answers
shared by all relations, and an answer a(s, r) drawn uniformly for every pair. Because the
pool is shared, the answer depends on the *pair*: an attention-only model, whose output is
a softmax-weighted sum of the subject's and relation's value vectors, cannot in general
store an arbitrary table of pairs, and an MLP can. Pretraining sequences are
``[s, r, a]`` (every fact, every epoch), trained by next-token prediction on all positions;
acquisition is the cross entropy (and accuracy) of the answer token after training (the
r token after s is uniform, so its loss is at best log R and is not reported).
Fine-tuning sequences are ``[s, q_r, a]``, with question tokens q_r never seen in
pretraining, for the subjects of a fine-tuning split (a fraction of all subjects); the
whole model is fine-tuned on the answer loss, and extraction is the answer accuracy on
the held-out subjects, whose facts were seen only in pretraining (chance = 1 / A).

Our sizes: S = 512, R = 4, A = 32, width 64, one head, MLP width 256 (ReLU), and an
attention-only model of width 84, which has about as many parameters as the model with
the MLP (so the comparison is not only one of size); Adam
(lr 3e-3 pretraining, 1e-3 fine-tuning), batch 256. The model is
:class:`gatelab.models.one_layer.OneLayerTransformer`; the departures from the paper are in
its docstring (its exact parametrisation and data were not available to us).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.one_layer import OneLayerTransformer
from ._loop import shuffled_batches, train_loop

NAME = "one-layer-facts"
DESCRIPTION = "one-layer transformer with vs without MLP: fact acquisition and extraction"

SCALES = {
    "smoke": dict(
        subjects=64,
        relations=2,
        answers=8,
        dim=16,
        wide_dim=20,
        pre_epochs=3,
        ft_epochs=2,
        fractions=(0.5,),
        seeds=1,
    ),
    "full": dict(
        subjects=512,
        relations=4,
        answers=32,
        dim=64,
        wide_dim=84,
        pre_epochs=200,
        ft_epochs=50,
        fractions=(0.1, 0.5),
        seeds=2,
    ),
}
BATCH = 256


@dataclass
class Facts:
    """a(s, r) for S subjects and R relations; token ids laid out as
    [subjects | relations | questions | answers]."""

    answer: Tensor  # [S, R] in [0, A)
    num_subjects: int
    num_relations: int
    num_answers: int

    @property
    def vocab_size(self) -> int:
        return self.num_subjects + 2 * self.num_relations + self.num_answers

    def sequences(self, subjects: Tensor, question: bool) -> Tensor:
        """[len(subjects) * R, 3]: (s, r or q_r, a) for every relation of each subject."""
        s = subjects.repeat_interleave(self.num_relations)
        r = torch.arange(self.num_relations).repeat(len(subjects))
        rel = self.num_subjects + r + (self.num_relations if question else 0)
        a = self.num_subjects + 2 * self.num_relations + self.answer[s, r]
        return torch.stack([s, rel, a], 1)


def make_facts(num_subjects: int, num_relations: int, num_answers: int, seed: int = 0) -> Facts:
    """Uniform answers from one shared pool; see the module docstring."""
    for name, value in (
        ("num_subjects", num_subjects),
        ("num_relations", num_relations),
        ("num_answers", num_answers),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"make_facts: {name} must be a positive int, got {value!r}")
    gen = torch.Generator().manual_seed(seed)
    answer = torch.randint(0, num_answers, (num_subjects, num_relations), generator=gen)
    return Facts(answer, num_subjects, num_relations, num_answers)


def _epochs(model, seqs: Tensor, epochs: int, lr: float, answer_only: bool, seed: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)

    def loss_fn(model, idx: Tensor) -> Tensor:
        batch = seqs[idx]
        logits = model(batch[:, :2])
        if answer_only:
            return F.cross_entropy(logits[:, 1], batch[:, 2])
        return F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())

    train_loop(model, loss_fn, shuffled_batches(len(seqs), BATCH, epochs, gen), opt)


@torch.no_grad()
def answer_metrics(model, seqs: Tensor) -> tuple[float, float]:
    """(answer cross entropy in nats, answer accuracy) of sequences [n, 3]."""
    model.eval()
    logits = model(seqs[:, :2])[:, 1]
    loss = float(F.cross_entropy(logits, seqs[:, 2]))
    return loss, float((logits.argmax(-1) == seqs[:, 2]).float().mean())


def run_seed(cfg: dict, mlp: bool, seed: int, dim: int | None = None) -> dict:
    facts = make_facts(cfg["subjects"], cfg["relations"], cfg["answers"], seed)
    everyone = torch.arange(cfg["subjects"])
    torch.manual_seed(seed)
    model = OneLayerTransformer(facts.vocab_size, dim or cfg["dim"], mlp=mlp, max_seq_len=3)
    pre = facts.sequences(everyone, question=False)
    _epochs(model, pre, cfg["pre_epochs"], 3e-3, answer_only=False, seed=seed)
    pre_loss, pre_acc = answer_metrics(model, pre)
    out = {
        "parameters": sum(p.numel() for p in model.parameters()),
        "pretrain_loss": pre_loss,
        "pretrain_acc": pre_acc,
        "finetune": {},
    }
    state = {k: v.clone() for k, v in model.state_dict().items()}
    order = torch.randperm(cfg["subjects"], generator=torch.Generator().manual_seed(seed + 1))
    for frac in cfg["fractions"]:
        model.load_state_dict(state)
        cut = max(1, int(frac * cfg["subjects"]))
        train_q = facts.sequences(order[:cut], question=True)
        held_q = facts.sequences(order[cut:], question=True)
        _epochs(model, train_q, cfg["ft_epochs"], 1e-3, answer_only=True, seed=seed)
        out["finetune"][str(frac)] = {
            "train_acc": answer_metrics(model, train_q)[1],
            "heldout_acc": answer_metrics(model, held_q)[1],
            "heldout_pretrain_acc": answer_metrics(model, facts.sequences(order[cut:], False))[1],
        }
    return out


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = ".") -> dict:
    cfg = SCALES[scale]
    arms = {
        "attention + MLP": (True, cfg["dim"]),
        "attention only": (False, cfg["dim"]),
        # as many parameters as the MLP model, so the MLP's effect is not just its size
        "attention only, wider": (False, cfg["wide_dim"]),
    }
    results = {
        label: [run_seed(cfg, mlp, seed + s, dim) for s in range(cfg["seeds"])]
        for label, (mlp, dim) in arms.items()
    }
    return {"table": table(results, cfg), "results": results}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def table(results: dict, cfg: dict) -> str:
    fr = [str(f) for f in cfg["fractions"]]
    head = " | ".join(f"held-out QA acc. (FT on {float(f):.0%})" for f in fr)
    lines = [
        f"| model | parameters | pretrain answer loss (nats) | pretrain answer acc. | {head} |",
        "|---|---:|---:|---:|" + "---:|" * len(fr),
    ]
    for label, runs in results.items():
        cells = " | ".join(
            f"{_mean(r['finetune'][f]['heldout_acc'] for r in runs):.3f} "
            f"(FT train {_mean(r['finetune'][f]['train_acc'] for r in runs):.2f})"
            for f in fr
        )
        lines.append(
            f"| {label} | {runs[0]['parameters']:,} | {_mean(r['pretrain_loss'] for r in runs):.3f} "
            f"| {_mean(r['pretrain_acc'] for r in runs):.3f} | {cells} |"
        )
    lines.append(
        f"\nMeans of {cfg['seeds']} seeds; S={cfg['subjects']} subjects, R={cfg['relations']} "
        f"relations, A={cfg['answers']} answers (chance {1 / cfg['answers']:.3f}, optimal "
        f"pretraining answer loss 0); {cfg['pre_epochs']} pretraining and {cfg['ft_epochs']} "
        "fine-tuning epochs."
    )
    return "\n".join(lines)
