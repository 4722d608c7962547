"""MVP vs MLP-FT: is prompting a pretrained LM more robust to character substitutions?

Claim tested: "Model-tuning Via Prompts Makes NLP Models Adversarially Robust" (Raman et al.,
arXiv 2303.07320): MVP (prompt template + verbaliser scores, no new parameters) is markedly
more robust to adversarial substitutions than MLP-FT (a random MLP head), by 8 points on
average over their datasets, attacks and models; adversarial training helps both.

Protocol (ours, a small analogue):

- Model: the two-domain MoE byte LM of :mod:`gatelab.experiments._trained_lm` (trained once
  on the corpus's train documents with seed ``seed``, cached under ``out_dir``).
- Task: is a snippet of ``snippet_len`` bytes prose (pydoc topics) or code (standard library)?
  Training snippets come from the corpus's **train** documents, test snippets from its **val**
  documents (the same corpus seed as the LM's, so the LM never saw a test document in
  pre-training; it did see the training snippets, which both classifiers share). Classes are
  balanced in both sets.
- Classifiers (:mod:`gatelab.adapt.mvp`): MLP-FT (mean-pooled final hidden state + RoBERTa's
  head) and MVP (template ``" This is "``, verbalisers ``"prose"``/``"code"``), each a
  fresh copy of the LM fine-tuned end to end: AdamW, the same steps, batch, rate and batches
  for both; with and without adversarial training (half clean, half attacked loss, the attack
  run on the fly with a cheaper budget).
- Attack (:mod:`gatelab.adapt.text_attack`): greedy keyboard/case/look-alike substitutions,
  up to ``edit_fraction`` of the snippet's bytes, ``queries_per_step`` candidates per step.
- Reported: clean accuracy on ``test`` snippets and attacked accuracy on the first
  ``attacked`` of them, mean ± std over ``seeds`` fine-tuning seeds (one pre-trained LM).
"""

from __future__ import annotations

import copy
import itertools
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapt.mvp import (
    AdversarialLoss,
    MLPHeadClassifier,
    PromptClassifier,
    accuracy,
    classification_loss,
)
from ..adapt.text_attack import edit_budget, greedy_substitution_attack
from ..data.text import DOMAINS, load_corpus
from . import mean_pm_std
from ._loop import random_batches, train_loop, warmup_then_cosine
from ._trained_lm import trained_moe_lm

NAME = "mvp"
DESCRIPTION = (
    "prose-vs-code classifiers from the byte LM: MLP head (MLP-FT) vs prompt + verbalisers "
    "(MVP), clean and under a greedy character-substitution attack, with adversarial training"
)

SCALES = {
    "smoke": {
        "snippet_len": 8,
        "train": 32,
        "test": 16,
        "attacked": 8,
        "steps": 3,
        "batch_size": 4,
        "lr": 1e-3,
        "edit_fraction": 0.25,
        "queries_per_step": 6,
        "adv_edits": 1,
        "adv_queries": 3,
        "seeds": 1,
    },
    "full": {
        "snippet_len": 32,
        "train": 1600,
        "test": 400,
        "attacked": 150,
        "steps": 100,
        "batch_size": 16,
        "lr": 3e-4,
        "edit_fraction": 0.1,
        "queries_per_step": 12,
        "adv_edits": 1,
        "adv_queries": 6,
        "seeds": 2,
    },
}
TEMPLATE = " This is "
VERBALISERS = ("prose", "code")
METHODS = ("MLP-FT", "MVP")


def snippets(split: str, count: int, length: int, seed: int, corpus_seed: int):
    """(ids [count, length] int64, labels [count]): ``count // 2`` snippets per domain (label =
    index in DOMAINS), each from a document of ``split`` drawn by length, at a random offset."""
    corpus = load_corpus(seed=corpus_seed)
    gen = torch.Generator().manual_seed(seed)
    ids, labels = [], []
    for label, domain in enumerate(DOMAINS):
        docs = [d.data for d in corpus.documents(split, domain) if len(d.data) > length]
        sizes = torch.tensor([len(d) - length for d in docs], dtype=torch.float)
        for i in torch.multinomial(sizes, count // 2, replacement=True, generator=gen).tolist():
            start = int(torch.randint(len(docs[i]) - length, (1,), generator=gen))
            ids.append(torch.tensor(list(docs[i][start : start + length])))
            labels.append(label)
    order = torch.randperm(len(ids), generator=gen)
    return torch.stack(ids)[order], torch.tensor(labels)[order]


def build(method: str, lm) -> torch.nn.Module:
    if method == "MLP-FT":
        return MLPHeadClassifier(copy.deepcopy(lm), len(DOMAINS))
    return PromptClassifier(copy.deepcopy(lm), VERBALISERS, (TEMPLATE,))


def attack_kwargs(cfg: dict) -> dict:
    return {
        "max_edits": edit_budget(cfg["snippet_len"], cfg["edit_fraction"]),
        "queries_per_step": cfg["queries_per_step"],
    }


def fine_tune(method: str, lm, train, cfg: dict, seed: int, adversarial: bool):
    """A fresh copy of ``lm`` as ``method``, fine-tuned on ``train``; (model, seconds)."""
    torch.manual_seed(seed)
    model = build(method, lm)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.01)
    schedule = warmup_then_cosine(opt, max(1, cfg["steps"] // 10), cfg["steps"])
    gen = torch.Generator().manual_seed(seed)
    batches = (
        (train[0][i], train[1][i]) for i in random_batches(len(train[1]), cfg["batch_size"], gen)
    )
    loss_fn = classification_loss
    if adversarial:
        attack = {"max_edits": cfg["adv_edits"], "queries_per_step": cfg["adv_queries"]}
        loss_fn = AdversarialLoss(attack, seed=seed)
    start = time.perf_counter()
    train_loop(model, loss_fn, batches, opt, steps=cfg["steps"], schedule=schedule, clip=1.0)
    return model.eval(), time.perf_counter() - start


def evaluate(model, test, cfg: dict, seed: int) -> dict:
    n = cfg["attacked"]
    start = time.perf_counter()
    result = greedy_substitution_attack(
        model, test[0][:n], test[1][:n], seed=seed, **attack_kwargs(cfg)
    )
    return {
        "clean": accuracy(model, *test),
        "clean_attacked_subset": accuracy(model, test[0][:n], test[1][:n]),
        "attacked": float((~result.flipped).float().mean()),
        "mean_edits_of_flipped": float(result.edits[result.flipped].float().mean())
        if result.flipped.any()
        else 0.0,
        "mean_queries": float(result.queries.float().mean()),
        "attack_seconds": time.perf_counter() - start,
    }


def run(scale: str = "full", seed: int = 0, out_dir: str | Path = "runs/experiments/mvp") -> dict:
    cfg = SCALES[scale]
    out = Path(out_dir)
    lm = trained_moe_lm(scale, seed, out)
    need = cfg["snippet_len"] + len(TEMPLATE) + max(map(len, VERBALISERS))
    if need > lm.model.config.max_seq_len:
        raise ValueError(f"snippet_len too long: {need} bytes > max_seq_len")
    train = snippets("train", cfg["train"], cfg["snippet_len"], seed, seed)
    test = snippets("val", cfg["test"], cfg["snippet_len"], seed + 1, seed)
    zero_shot = accuracy(build("MVP", lm.model), *test)
    runs: dict[str, list[dict]] = {}
    jobs = list(itertools.product(METHODS, (False, True), range(seed, seed + cfg["seeds"])))
    for method, adversarial, s in tqdm(jobs, desc="mvp", disable=scale == "smoke"):
        key = f"{method}{' + adv' if adversarial else ''}"
        model, secs = fine_tune(method, lm.model, train, cfg, s, adversarial)
        runs.setdefault(key, []).append(
            {"seed": s, "train_seconds": secs, **evaluate(model, test, cfg, s)}
        )
    result = {
        "table": _table(runs, zero_shot),
        "settings": cfg,
        "attack": attack_kwargs(cfg) | {"candidates": "keyboard"},
        "zero_shot_mvp_clean": zero_shot,
        "lm": {"run_dir": str(lm.run_dir), "train_seconds": lm.train_seconds},
        "runs": runs,
        "mvp_minus_mlp_attacked": _paired(runs, "MVP", "MLP-FT"),
        "mvp_minus_mlp_attacked_adv": _paired(runs, "MVP + adv", "MLP-FT + adv"),
    }
    return result


def _paired(runs: dict, a: str, b: str) -> list[float]:
    return [x["attacked"] - y["attacked"] for x, y in zip(runs[a], runs[b], strict=True)]


def _table(runs: dict, zero_shot: float) -> str:
    rows = [
        "| classifier | clean accuracy | attacked accuracy | clean on attacked subset "
        "| edits to flip | queries / example | fine-tune s | attack s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for key, rs in runs.items():
        col = {k: [r[k] for r in rs] for k in rs[0] if k != "seed"}
        rows.append(
            f"| {key} | {mean_pm_std(col['clean'])} | {mean_pm_std(col['attacked'])} | "
            f"{mean_pm_std(col['clean_attacked_subset'])} | {statistics.fmean(col['mean_edits_of_flipped']):.2f} | "
            f"{statistics.fmean(col['mean_queries']):.0f} | {statistics.fmean(col['train_seconds']):.0f} | "
            f"{statistics.fmean(col['attack_seconds']):.0f} |"
        )
    rows.append(f"| MVP zero-shot (no fine-tuning) | {zero_shot:.3f} | | | | | | |")
    return "\n".join(rows)
